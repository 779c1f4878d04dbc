"""Tests for memshard.data: every input format, transforms, inspection, bad input, caching."""

import hashlib
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from memshard.commands.cli import main
from memshard.data import (
    ImageDataset,
    inspect_dataset,
    load_dataset,
    prepare_dataset,
    resolve_dataset,
)
from memshard.errors import MemshardError


def solid(color, size=(8, 8), mode="RGB"):
    return Image.new(mode, size, color)


def save(img, path, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def content_id(chw):
    return hashlib.sha256(np.ascontiguousarray(chw, dtype=np.uint8).tobytes()).hexdigest()[:16]


@pytest.fixture
def class_folder(tmp_path):
    """Two classes; cat/a.png is red, cat/b.png green, dog/c.png blue, dog/d.jpg a grey JPEG."""
    root = tmp_path / "pets"
    save(solid((255, 0, 0)), root / "cat" / "a.png")
    save(solid((0, 255, 0)), root / "cat" / "b.PNG")
    save(solid((0, 0, 255)), root / "dog" / "c.png")
    save(solid((128, 128, 128)), root / "dog" / "d.jpg", "JPEG")
    return root


def hf_parquet(path, images, labels, names=None, ids=None):
    columns = {"image": pa.array([{"bytes": png_bytes(im), "path": f"img{i}.png"}
                                  for i, im in enumerate(images)],
                                 pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
               "label": pa.array(labels, pa.int64())}
    if ids is not None:
        columns["id"] = pa.array(ids)
    table = pa.table(columns)
    if names is not None:
        features = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
        table = table.replace_schema_metadata(
            {b"huggingface": json.dumps({"info": {"features": features}}).encode()})
    pq.write_table(table, path)
    return path


# ------------------------------------------------------------------ round trips


def test_png_folder_round_trip(class_folder, tmp_path):
    out = prepare_dataset(str(class_folder), tmp_path / "ds")
    ds = load_dataset(out)
    assert isinstance(ds, ImageDataset)
    assert list(ds.sample_ids) == ["cat/a.png", "cat/b.PNG", "dog/c.png", "dog/d.jpg"]
    assert ds.images.shape == (4, 3, 8, 8) and ds.images.dtype == np.uint8
    assert (ds.resolution, ds.channels, len(ds)) == (8, 3, 4)
    assert ds.label_names == ("cat", "dog")
    assert ds.labels.tolist() == [0, 0, 1, 1] and ds.labels.dtype == np.int64
    assert (ds.images[0, :, 3, 5] == [255, 0, 0]).all()
    assert (ds.images[2] == np.array([0, 0, 255], np.uint8)[:, None, None]).all()
    assert np.abs(ds.images[3].astype(int) - 128).max() <= 3  # JPEG is lossy
    assert ds.sources[0] == str(class_folder / "cat" / "a.png")
    assert ds.content_hashes[0] == hashlib.sha256(ds.images[0].tobytes()).hexdigest()
    assert not ds.images.flags.writeable
    again = load_dataset(prepare_dataset(str(class_folder), tmp_path / "ds2"))
    assert list(again.sample_ids) == list(ds.sample_ids) and again.fingerprint == ds.fingerprint


def test_flat_folder_has_null_labels(tmp_path):
    save(solid(7, mode="L"), tmp_path / "flat" / "x.png")
    ds = load_dataset(prepare_dataset(str(tmp_path / "flat"), tmp_path / "ds"))
    assert ds.labels.tolist() == [-1] and ds.label_names == () and ds.images.shape == (1, 1, 8, 8)
    assert (ds.images == 7).all()


def test_hf_parquet_round_trip(tmp_path):
    images = [solid((10 * i, 0, 200)) for i in range(3)]
    src = hf_parquet(tmp_path / "train.parquet", images, [2, 0, -1], names=["ant", "bee", "cow"])
    ds = load_dataset(prepare_dataset(str(src), tmp_path / "ds"))
    assert ds.images.shape == (3, 3, 8, 8)
    assert ds.labels.tolist() == [2, 0, -1] and ds.label_names == ("ant", "bee", "cow")
    assert pq.read_table(ds.path + "/images.parquet").column("label").null_count == 1  # HF -1 = null
    assert [ds.images[i, 0, 0, 0] for i in range(3)] == [0, 10, 20]
    assert list(ds.sources) == [f"{src}#{i}" for i in range(3)]
    assert list(ds.sample_ids) == [content_id(ds.images[i]) for i in range(3)]
    again = load_dataset(prepare_dataset(str(src), tmp_path / "ds2"))
    assert list(again.sample_ids) == list(ds.sample_ids)


def test_hf_parquet_folder_with_ids_and_string_labels(tmp_path):
    folder = tmp_path / "hf" / "data"
    folder.mkdir(parents=True)
    for part, (ids, labels) in enumerate([(["q", "r"], ["zebra", "ape"]), (["s"], ["zebra"])]):
        table = pa.table({
            "img": pa.array([{"bytes": png_bytes(solid(40 * part + i, mode="L")), "path": None}
                             for i in range(len(ids))]),
            "labels": pa.array(labels), "image_id": pa.array(ids)})
        pq.write_table(table, folder / f"train-{part:05d}.parquet")
    ds = load_dataset(prepare_dataset(str(tmp_path / "hf"), tmp_path / "ds"))
    assert list(ds.sample_ids) == ["q", "r", "s"]
    assert ds.label_names == ("ape", "zebra") and ds.labels.tolist() == [1, 0, 1]
    assert ds.images[:, 0, 0, 0].tolist() == [0, 1, 40]


def test_npy_uint8_round_trip(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (5, 16, 16), dtype=np.uint8)
    arr[3] = arr[1]  # planted repeat: its id gets a "-1" suffix
    np.save(tmp_path / "x.npy", arr)
    ds = load_dataset(prepare_dataset(str(tmp_path / "x.npy"), tmp_path / "ds"))
    assert ds.images.shape == (5, 1, 16, 16)
    np.testing.assert_array_equal(ds.images[:, 0], arr)
    assert list(ds.sample_ids) == [content_id(a[None]) for a in arr[:3]] + \
        [content_id(arr[1][None]) + "-1", content_id(arr[4][None])]
    assert ds.labels.tolist() == [-1] * 5 and ds.sources[2] == f"{tmp_path / 'x.npy'}#2"
    again = load_dataset(prepare_dataset(str(tmp_path / "x.npy"), tmp_path / "ds2"))
    assert list(again.sample_ids) == list(ds.sample_ids)


def test_npz_float_with_labels(tmp_path):
    arr = np.zeros((3, 8, 8, 3), np.float32)
    arr[0, ..., 0], arr[1, ..., 1], arr[2] = 1.0, 0.5, 0.25
    np.savez(tmp_path / "x.npz", x=arr, y=np.array([4, -1, 2]))
    ds = load_dataset(prepare_dataset(str(tmp_path / "x.npz"), tmp_path / "ds"))
    assert ds.images.shape == (3, 3, 8, 8) and ds.labels.tolist() == [4, -1, 2]
    assert ds.images[0, :, 0, 0].tolist() == [255, 0, 0]
    assert ds.images[1, :, 0, 0].tolist() == [0, 128, 0]  # rint(127.5) rounds to even: 128
    assert ds.images[2, :, 0, 0].tolist() == [64, 64, 64]


def test_digits_round_trip(tmp_path):
    from sklearn.datasets import load_digits

    ds = load_dataset(prepare_dataset("digits", tmp_path / "ds"))
    ref = load_digits()
    assert ds.images.shape == (1797, 1, 8, 8)
    np.testing.assert_array_equal(ds.images[:, 0], np.rint(ref.images * 255 / 16).astype(np.uint8))
    assert ds.images.max() == 255
    np.testing.assert_array_equal(ds.labels, ref.target)
    assert ds.label_names == tuple("0123456789")
    assert ds.sample_ids[0] == "digits-00000" and ds.sample_ids[1796] == "digits-01796"
    assert ds.sources[5] == "digits#5"
    assert load_dataset(prepare_dataset("digits", tmp_path / "ds2")).fingerprint == ds.fingerprint


# ------------------------------------------------------------------ transforms


def test_resize_crop_and_to_grayscale(tmp_path):
    img = Image.new("RGB", (40, 10), (0, 0, 255))  # blue borders are cropped away
    img.paste((255, 0, 0), (10, 0, 30, 10))  # red centre
    save(img, tmp_path / "wide" / "w.png")
    ds = load_dataset(prepare_dataset(str(tmp_path / "wide"), tmp_path / "ds", resolution=8, channels=1))
    assert ds.images.shape == (1, 1, 8, 8)
    assert (ds.images == 76).all()  # Pillow luma of pure red: 0.299 * 255


def test_upscale_and_gray_to_rgb(tmp_path):
    np.save(tmp_path / "g.npy", np.full((2, 8, 8), 90, np.uint8))
    ds = load_dataset(prepare_dataset(str(tmp_path / "g.npy"), tmp_path / "ds", resolution=16, channels=3))
    assert ds.images.shape == (2, 3, 16, 16) and (ds.images == 90).all()


def test_rgba_and_palette_become_rgb(tmp_path):
    save(Image.new("RGBA", (8, 8), (10, 20, 30, 0)), tmp_path / "m" / "a.png")
    save(Image.new("RGB", (8, 8), (1, 2, 3)).convert("P"), tmp_path / "m" / "b.png")
    ds = load_dataset(prepare_dataset(str(tmp_path / "m"), tmp_path / "ds"))
    assert ds.images.shape == (2, 3, 8, 8)
    assert ds.images[0, :, 0, 0].tolist() == [10, 20, 30]


# ------------------------------------------------------------------ inspection


def test_inspect_finds_duplicates_and_histogram(class_folder, tmp_path, capsys):
    save(solid((255, 0, 0)), class_folder / "dog" / "copy_of_a.png")
    save(solid((0, 255, 0)), class_folder / "cat" / "z.png")
    save(solid((0, 255, 0)), class_folder / "dog" / "copy_of_b.png")
    report = inspect_dataset(prepare_dataset(str(class_folder), tmp_path / "ds"))
    assert report["count"] == 7 and report["shape"] == [3, 8, 8]
    assert report["label_histogram"] == {"cat": 3, "dog": 4} and report["unlabeled"] == 0
    assert report["duplicate_groups"] == [["cat/b.PNG", "cat/z.png", "dog/copy_of_b.png"],
                                          ["cat/a.png", "dog/copy_of_a.png"]]
    assert report["fingerprint"] == load_dataset(tmp_path / "ds").fingerprint
    assert main(["data", "inspect", str(tmp_path / "ds")]) == 0
    text = capsys.readouterr().out
    assert "7 images, 3x8x8" in text and "cat: 3, dog: 4" in text
    assert "2 groups of identical images, 5 samples" in text
    assert "3 x  cat/b.PNG, cat/z.png, dog/copy_of_b.png" in text


# ------------------------------------------------------------------ bad input


def _text_png(tmp_path):
    save(solid(1, mode="L"), tmp_path / "src" / "ok.png")
    (tmp_path / "src" / "bad.png").write_text("not an image")
    return str(tmp_path / "src"), "bad.png"


def _truncated_png(tmp_path):
    data = png_bytes(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64), np.uint8)))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "cut.png").write_bytes(data[: len(data) // 2])
    return str(tmp_path / "src"), "cut.png"


def _mixed_channels(tmp_path):
    save(solid(1, mode="L"), tmp_path / "src" / "a.png")
    save(solid((1, 2, 3)), tmp_path / "src" / "b.png")
    return str(tmp_path / "src"), "--channels"


def _empty_folder(tmp_path):
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "notes.txt").write_text("no images here")
    return str(tmp_path / "src"), "holds no images"


def _zero_rows(tmp_path):
    np.save(tmp_path / "e.npy", np.zeros((0, 8, 8), np.uint8))
    return str(tmp_path / "e.npy"), "e.npy"


def _duplicate_ids(tmp_path):
    src = hf_parquet(tmp_path / "d.parquet", [solid(1), solid(2)], [0, 1], ids=["same", "same"])
    return str(src), "'same'"


def _corrupt_parquet(tmp_path):
    (tmp_path / "c.parquet").write_text("definitely not parquet\nsecond line")
    return str(tmp_path / "c.parquet"), "c.parquet"


def _float_out_of_range(tmp_path):
    np.save(tmp_path / "f.npy", np.linspace(-1, 1, 2 * 8 * 8).reshape(2, 8, 8))
    return str(tmp_path / "f.npy"), "-1.0 to 1.0"


def _non_square(tmp_path):
    save(solid(3, size=(16, 8), mode="L"), tmp_path / "src" / "r.png")
    return str(tmp_path / "src"), "--resolution"


def _bad_native_size(tmp_path):
    np.save(tmp_path / "m.npy", np.zeros((2, 28, 28), np.uint8))
    return str(tmp_path / "m.npy"), "--resolution 32"


BAD_SOURCES = [
    pytest.param(lambda tmp: (str(tmp / "nope"), "nope"), id="missing-path"),
    pytest.param(lambda tmp: ("cifar10", "cifar10"), id="unknown-bundled-name"),
    pytest.param(_text_png, id="text-png"),
    pytest.param(_truncated_png, id="truncated-png"),
    pytest.param(_mixed_channels, id="mixed-channels"),
    pytest.param(_empty_folder, id="empty-folder"),
    pytest.param(_zero_rows, id="zero-rows"),
    pytest.param(_duplicate_ids, id="duplicate-ids"),
    pytest.param(_corrupt_parquet, id="corrupt-parquet"),
    pytest.param(_float_out_of_range, id="float-out-of-range"),
    pytest.param(_non_square, id="non-square"),
    pytest.param(_bad_native_size, id="native-size-not-multiple-of-8"),
]


def assert_one_line_error(excinfo, needle):
    message = str(excinfo.value)
    assert "\n" not in message and needle in message, message


@pytest.mark.parametrize("make_source", BAD_SOURCES)
def test_bad_source_raises_one_line_and_writes_nothing(tmp_path, make_source):
    source, needle = make_source(tmp_path)
    with pytest.raises(MemshardError) as excinfo:
        prepare_dataset(source, tmp_path / "out")
    assert_one_line_error(excinfo, needle)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temp dirs left


@pytest.mark.parametrize("resolution", [30, 4, 2000, 0])
def test_bad_resolution(tmp_path, resolution):
    with pytest.raises(MemshardError) as excinfo:
        prepare_dataset("digits", tmp_path / "out", resolution=resolution)
    assert_one_line_error(excinfo, f"resolution {resolution} cannot be used")
    assert not (tmp_path / "out").exists()


def test_load_rejects_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(MemshardError) as excinfo:
        load_dataset(tmp_path)
    assert_one_line_error(excinfo, "images.parquet")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "images.parquet").write_text("garbage")
    with pytest.raises(MemshardError) as excinfo:
        load_dataset(tmp_path / "bad")
    assert_one_line_error(excinfo, str(tmp_path / "bad" / "images.parquet"))
    (tmp_path / "foreign").mkdir()
    pq.write_table(pa.table({"a": [1]}), tmp_path / "foreign" / "images.parquet")
    with pytest.raises(MemshardError) as excinfo:
        load_dataset(tmp_path / "foreign")
    assert_one_line_error(excinfo, "no memshard metadata")


def test_refuses_to_replace_user_directory(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("precious")
    with pytest.raises(MemshardError) as excinfo:
        prepare_dataset("digits", tmp_path / "out")
    assert_one_line_error(excinfo, "not a memshard dataset")
    assert (tmp_path / "out" / "thesis.tex").read_text() == "precious"


def test_replaces_old_dataset_only_on_success(tmp_path):
    np.save(tmp_path / "a.npy", np.full((2, 8, 8), 5, np.uint8))
    out = prepare_dataset(str(tmp_path / "a.npy"), tmp_path / "out")
    with pytest.raises(MemshardError):
        prepare_dataset(str(tmp_path / "missing.npy"), out)
    assert len(load_dataset(out)) == 2  # the failed prepare left the old dataset intact
    prepare_dataset("digits", out)
    assert len(load_dataset(out)) == 1797
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "out"]


# ------------------------------------------------------------------ resolve_dataset


def test_resolve_dataset_caches_and_passes_prepared_dirs(tmp_path):
    np.save(tmp_path / "a.npy", np.full((3, 8, 8), 9, np.uint8))
    cache = tmp_path / "cache"
    first = resolve_dataset(str(tmp_path / "a.npy"), 16, None, cache)
    stamp = (first / "images.parquet").stat().st_mtime_ns
    second = resolve_dataset(str(tmp_path / "a.npy"), 16, None, cache)
    assert second == first and (second / "images.parquet").stat().st_mtime_ns == stamp
    assert load_dataset(first).images.shape == (3, 1, 16, 16)
    assert resolve_dataset(str(tmp_path / "a.npy"), 8, None, cache) != first  # other settings
    np.save(tmp_path / "a.npy", np.full((4, 8, 8), 9, np.uint8))  # changed source: new entry
    os.utime(tmp_path / "a.npy", ns=(1, 1))
    changed = resolve_dataset(str(tmp_path / "a.npy"), 16, None, cache)
    assert changed != first and len(load_dataset(changed)) == 4
    assert resolve_dataset(str(first), 16, 1, cache) == first  # prepared dir is used as is
    assert resolve_dataset(str(first), None, None, cache) == first
    with pytest.raises(MemshardError) as excinfo:
        resolve_dataset(str(first), 32, None, cache)
    assert_one_line_error(excinfo, "resolution 16, not 32")
    with pytest.raises(MemshardError) as excinfo:
        resolve_dataset(str(tmp_path / "gone"), None, None, cache)
    assert_one_line_error(excinfo, "gone")


# ------------------------------------------------------------------ on-disk format


def test_parquet_layout_and_metadata(tmp_path):
    ds = load_dataset(prepare_dataset("digits", tmp_path / "ds"))
    schema = pq.read_schema(tmp_path / "ds" / "images.parquet")
    assert schema.names == ["sample_id", "image", "label", "source", "content_hash"]
    assert schema.field("image").type == pa.binary(64) and schema.field("label").type == pa.int64()
    meta = {k.decode(): v.decode() for k, v in schema.metadata.items()}
    assert meta["memshard.format_version"] == "1" and meta["memshard.count"] == "1797"
    assert (meta["memshard.resolution"], meta["memshard.channels"]) == ("8", "1")
    assert json.loads(meta["memshard.label_names"]) == list("0123456789")
    assert meta["memshard.fingerprint"] == ds.fingerprint and len(ds.fingerprint) == 64


def test_loads_tensor_columns_split_over_row_groups(tmp_path):
    """A file holding the image column as a fixed-shape tensor, in many row groups, loads the same."""
    ds = load_dataset(prepare_dataset("digits", tmp_path / "ds"))
    table = pq.read_table(tmp_path / "ds" / "images.parquet")
    tensor = pa.FixedShapeTensorArray.from_numpy_ndarray(np.array(ds.images))
    table = table.set_column(1, "image", tensor).replace_schema_metadata(table.schema.metadata)
    (tmp_path / "t").mkdir()
    pq.write_table(table, tmp_path / "t" / "images.parquet", row_group_size=100)
    assert pq.ParquetFile(tmp_path / "t" / "images.parquet").num_row_groups == 18
    np.testing.assert_array_equal(load_dataset(tmp_path / "t").images, ds.images)
