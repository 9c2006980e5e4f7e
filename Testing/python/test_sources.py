import json
from pathlib import Path

import pytest

from voco.data.sources import list_images, list_labelled_cases
from voco.errors import VocoInputError


def touch(*paths: Path) -> None:
    """Listing never opens images, so empty files stand in for them."""
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def write_json(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return path


def make_msd(root: Path) -> Path:
    touch(root / "imagesTr/a.nii.gz", root / "imagesTr/b.nii.gz", root / "imagesTs/c.nii.gz", root / "imagesTs/d.nii.gz")
    touch(root / "labelsTr/a.nii.gz", root / "labelsTr/b.nii.gz")
    return write_json(
        root / "dataset.json",
        {
            "name": "Test",
            "training": [
                {"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"},
                {"image": "./imagesTr/b.nii.gz", "label": "./labelsTr/b.nii.gz"},
            ],
            "test": ["./imagesTs/c.nii.gz", {"image": "./imagesTs/d.nii.gz"}],
        },
    )


def make_nnunet_v2(root: Path) -> Path:
    touch(
        root / "imagesTr/case1_0000.nii.gz",
        root / "imagesTr/case1_0001.nii.gz",
        root / "imagesTr/case2_0000.nii.gz",
        root / "imagesTr/case2_0001.nii.gz",
        root / "imagesTs/case9_0000.nii.gz",
        root / "labelsTr/case1.nii.gz",
        root / "labelsTr/case2.nii.gz",
    )
    return write_json(
        root / "dataset.json",
        {"channel_names": {"0": "CT", "1": "PET"}, "labels": {"background": 0, "organ": 1}, "file_ending": ".nii.gz"},
    )


def names(paths):
    return [path.name for path in paths]


def test_an_image_file_lists_itself(tmp_path):
    touch(tmp_path / "scan.nrrd")
    assert list_images([tmp_path / "scan.nrrd"]) == [tmp_path / "scan.nrrd"]


def test_a_folder_lists_its_own_image_files_sorted(tmp_path):
    touch(tmp_path / "b.nii", tmp_path / "a.nii.gz", tmp_path / "c.mha", tmp_path / "notes.txt")
    touch(tmp_path / "._a.nii.gz", tmp_path / "nested/d.nii.gz")  # a macOS resource fork; a subfolder
    assert names(list_images([tmp_path])) == ["a.nii.gz", "b.nii", "c.mha"]


def test_a_folder_with_imagesTr_lists_training_then_test_images(tmp_path):
    touch(tmp_path / "imagesTr/y.nii.gz", tmp_path / "imagesTr/x.nii.gz", tmp_path / "imagesTs/z.nrrd")
    touch(tmp_path / "labelsTr/x.nii.gz", tmp_path / "stray.nii.gz")
    images = list_images([tmp_path])
    assert images == [tmp_path / "imagesTr/x.nii.gz", tmp_path / "imagesTr/y.nii.gz", tmp_path / "imagesTs/z.nrrd"]


def test_an_msd_dataset_json_lists_training_and_test_images(tmp_path):
    dataset = make_msd(tmp_path)
    touch(tmp_path / "imagesTr/unlisted.nii.gz")
    expected = [tmp_path / f for f in ("imagesTr/a.nii.gz", "imagesTr/b.nii.gz", "imagesTs/c.nii.gz", "imagesTs/d.nii.gz")]
    assert list_images([dataset]) == expected
    assert list_images([tmp_path]) == expected  # a folder holding a dataset.json goes by it


def test_an_nnunet_v2_dataset_json_lists_the_first_channel_of_each_case(tmp_path):
    dataset = make_nnunet_v2(tmp_path)
    assert names(list_images([dataset])) == ["case1_0000.nii.gz", "case2_0000.nii.gz", "case9_0000.nii.gz"]


def test_a_list_file_resolves_relative_paths_against_its_folder(tmp_path):
    touch(tmp_path / "data/a.nii.gz", tmp_path / "data/b.nrrd", tmp_path / "elsewhere/c.nii")
    listing = tmp_path / "data/train.txt"
    listing.write_text(f"# training scans\na.nii.gz\n\n  b.nrrd  \n{tmp_path / 'elsewhere/c.nii'}\n")
    assert list_images([listing]) == [tmp_path / "data/a.nii.gz", tmp_path / "data/b.nrrd", tmp_path / "elsewhere/c.nii"]


def test_a_csv_list_takes_the_first_column_and_skips_a_header(tmp_path):
    touch(tmp_path / "a.nii.gz", tmp_path / "b.nii.gz")
    with_header = tmp_path / "with_header.csv"
    with_header.write_text("image,label\na.nii.gz,a_seg.nii.gz\nb.nii.gz,b_seg.nii.gz\n")
    without_header = tmp_path / "without_header.csv"
    without_header.write_text("a.nii.gz,1\nb.nii.gz,2\n")
    assert names(list_images([with_header])) == ["a.nii.gz", "b.nii.gz"]
    assert names(list_images([without_header])) == ["a.nii.gz", "b.nii.gz"]


def test_sources_keep_their_order_and_each_image_appears_once(tmp_path):
    touch(tmp_path / "folder/a.nii.gz", tmp_path / "folder/b.nii.gz", tmp_path / "c.nii.gz")
    listing = tmp_path / "list.lst"
    listing.write_text("c.nii.gz\nfolder/../folder/b.nii.gz\n")
    images = list_images([listing, tmp_path / "folder", str(tmp_path / "c.nii.gz")])
    assert [p.resolve() for p in images] == [
        (tmp_path / "c.nii.gz").resolve(),
        (tmp_path / "folder/b.nii.gz").resolve(),
        (tmp_path / "folder/a.nii.gz").resolve(),
    ]


def error_of(call, *args) -> str:
    with pytest.raises(VocoInputError) as caught:
        call(*args)
    return str(caught.value)


def test_a_missing_path_is_named(tmp_path):
    missing = tmp_path / "nope.nii.gz"
    assert error_of(list_images, [missing]) == f"{missing}: does not exist"


def test_invalid_json_reports_the_parser_message_and_line(tmp_path):
    dataset = tmp_path / "dataset.json"
    dataset.write_text('{\n  "training": [\n    {"image": }\n  ]\n}\n')
    assert error_of(list_images, [dataset]) == f"{dataset}: invalid JSON: Expecting value (line 3, column 15)"


def test_a_json_of_neither_dataset_form_is_rejected(tmp_path):
    dataset = write_json(tmp_path / "dataset.json", {"name": "x", "labels": {}})
    message = error_of(list_images, [dataset])
    assert message.startswith(f"{dataset}: neither an MSD dataset.json")
    assert "nnU-Net v2" in message


def test_a_missing_file_in_a_dataset_json_is_named(tmp_path):
    dataset = make_msd(tmp_path)
    (tmp_path / "imagesTs/c.nii.gz").unlink()
    assert error_of(list_images, [dataset]) == f"{dataset}: lists {tmp_path / 'imagesTs/c.nii.gz'}, which does not exist"


def test_a_missing_file_in_a_list_file_is_named(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("gone.nii.gz\n")
    assert error_of(list_images, [listing]) == f"{listing}: lists {tmp_path / 'gone.nii.gz'}, which does not exist"


def test_a_list_file_entry_that_is_no_image_is_named(tmp_path):
    touch(tmp_path / "report.pdf")
    listing = tmp_path / "list.txt"
    listing.write_text("report.pdf\n")
    assert error_of(list_images, [listing]).startswith(f"{listing}: lists {tmp_path / 'report.pdf'}, which is not an image")


def empty_folder(root: Path) -> Path:
    return root


def comment_only_list(root: Path) -> Path:
    (root / "list.txt").write_text("# nothing yet\n")
    return root / "list.txt"


def empty_msd_dataset(root: Path) -> Path:
    return write_json(root / "dataset.json", {"training": [], "test": []})


@pytest.mark.parametrize("make_source", [empty_folder, comment_only_list, empty_msd_dataset])
def test_a_source_without_images_is_rejected(tmp_path, make_source):
    source = make_source(tmp_path)
    assert error_of(list_images, [source]) == f"{source}: no images (.nii.gz, .nii, .nrrd, ...) found"


def test_a_file_of_unsupported_type_is_rejected(tmp_path):
    touch(tmp_path / "scan.dcm")
    assert error_of(list_images, [tmp_path / "scan.dcm"]) == (
        f"{tmp_path / 'scan.dcm'}: not an image (.nii.gz, .nii, .nrrd, ...), folder, dataset.json or list file"
    )


def test_labelled_cases_of_an_msd_dataset_are_its_training_pairs(tmp_path):
    make_msd(tmp_path)
    assert list_labelled_cases(tmp_path) == [
        (tmp_path / "imagesTr/a.nii.gz", tmp_path / "labelsTr/a.nii.gz"),
        (tmp_path / "imagesTr/b.nii.gz", tmp_path / "labelsTr/b.nii.gz"),
    ]


def test_labelled_cases_of_an_nnunet_v2_dataset_pair_channel_0_with_its_label(tmp_path):
    dataset = make_nnunet_v2(tmp_path)
    assert list_labelled_cases(dataset) == [
        (tmp_path / "imagesTr/case1_0000.nii.gz", tmp_path / "labelsTr/case1.nii.gz"),
        (tmp_path / "imagesTr/case2_0000.nii.gz", tmp_path / "labelsTr/case2.nii.gz"),
    ]


def test_labelled_cases_of_a_folder_match_names_without_the_channel_tag(tmp_path):
    touch(tmp_path / "imagesTr/p1_0000.nii.gz", tmp_path / "imagesTr/p1_0001.nii.gz", tmp_path / "imagesTr/p2_0000.nrrd")
    touch(tmp_path / "labelsTr/p1.nii.gz", tmp_path / "labelsTr/p2.nii.gz")
    assert list_labelled_cases(tmp_path) == [
        (tmp_path / "imagesTr/p1_0000.nii.gz", tmp_path / "labelsTr/p1.nii.gz"),
        (tmp_path / "imagesTr/p2_0000.nrrd", tmp_path / "labelsTr/p2.nii.gz"),
    ]


def test_an_image_without_label_is_named(tmp_path):
    touch(tmp_path / "imagesTr/p1.nii.gz", tmp_path / "imagesTr/p2.nii.gz", tmp_path / "labelsTr/p1.nii.gz")
    assert error_of(list_labelled_cases, tmp_path) == f"{tmp_path}: image p2.nii.gz has no label in labelsTr/"
    dataset = make_nnunet_v2(tmp_path / "nnunet")
    (tmp_path / "nnunet/labelsTr/case2.nii.gz").unlink()
    assert error_of(list_labelled_cases, dataset) == (
        f"{dataset}: image case2_0000.nii.gz has no label {tmp_path / 'nnunet/labelsTr/case2.nii.gz'}"
    )


def test_an_msd_training_case_without_label_is_named(tmp_path):
    touch(tmp_path / "imagesTr/a.nii.gz")
    dataset = write_json(tmp_path / "dataset.json", {"training": [{"image": "./imagesTr/a.nii.gz"}]})
    assert error_of(list_labelled_cases, dataset) == f"{dataset}: training case a.nii.gz has no label"
