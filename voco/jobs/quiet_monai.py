"""Silencing what MONAI announces on every unreadable file, in the CLI and in its worker processes."""

from __future__ import annotations

import logging
import warnings


def quiet_monai() -> None:
    """MONAI's LoadImage tries its DICOM reader on every file nibabel cannot read, and that reader
    announces each time that the optional GPU decoder nvImageCodec is missing: a logged line and a
    UserWarning before our one ``error:`` line. Only those two are silenced; nothing of ours."""
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec", category=UserWarning)
