"""The safetensors container: qformat's layout equals safetensors' own bytes; the strict reader rejects damage."""

from __future__ import annotations

import errno
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qformat.errors import CorruptCheckpointError, OutputError, WriteError
from qformat.io import ShardWriter, atomic_output_dir, check_output_location, layout_file, read_header
from qformat.io.dtypes import SAFETENSORS_CODES, TORCH_DTYPES, tensor_bytes
from qformat.io.safetensors_format import SHARD_METADATA
from qformat.io.writer import write_error
from qformat.spec.layout import DTYPE_SIZES, TensorSpec

DTYPES = [torch.int8, torch.uint8, torch.int64, torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn,
          torch.int32, torch.float64, torch.bool]


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, dtype in enumerate(DTYPES):
        shape = (int(torch.randint(1, 5, (1,), generator=gen)), int(torch.randint(1, 7, (1,), generator=gen)))
        raw = torch.randint(0, 255, shape, generator=gen, dtype=torch.uint8)
        t = raw.to(dtype) if dtype in (torch.bool, torch.int8, torch.uint8) else torch.randn(shape, generator=gen).to(dtype)
        out[f"layer.{(i * 7) % 5}.t{i}"] = t
    out["zzz.scalar"] = torch.zeros(3, 1)
    return out


def _stream(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    specs = [TensorSpec(k, SAFETENSORS_CODES[v.dtype], tuple(v.shape)) for k, v in tensors.items()]
    writer = ShardWriter(path, layout_file(specs, SHARD_METADATA))
    for name in reversed(list(tensors)):  # any order: each tensor goes to its own offset
        sink = writer.sink(name)
        sink.write(tensor_bytes(tensors[name]))
        sink.finish()
    writer.close()


@pytest.mark.parametrize("seed", range(3))
def test_streamed_file_is_byte_identical_to_safetensors(tmp_path, seed):
    tensors = _tensors(seed)
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})  # what transformers writes
    _stream(tmp_path / "ours.safetensors", tensors)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    with safe_open(tmp_path / "ours.safetensors", framework="pt") as fh:
        for name, t in tensors.items():
            assert torch.equal(fh.get_tensor(name).view(torch.uint8), t.view(torch.uint8))



def test_torch_dtypes_cover_every_format_dtype_with_its_size():
    assert set(TORCH_DTYPES) == set(DTYPE_SIZES)
    for code, dtype in TORCH_DTYPES.items():
        assert dtype.itemsize == DTYPE_SIZES[code], code
        assert SAFETENSORS_CODES[dtype] == code


def test_tensor_bytes_are_the_row_major_bytes_of_any_tensor():
    t = torch.arange(12, dtype=torch.int16).reshape(3, 4)
    assert bytes(tensor_bytes(t)) == t.numpy().tobytes()
    assert bytes(tensor_bytes(t.t())) == t.t().contiguous().numpy().tobytes()  # a non-contiguous view is copied
    assert bytes(tensor_bytes(torch.empty(0, 5, dtype=torch.float8_e4m3fn))) == b""
    assert bytes(tensor_bytes(torch.ones(2, requires_grad=True))) == torch.ones(2).numpy().tobytes()

def test_writer_refuses_an_incomplete_tensor(tmp_path):
    writer = ShardWriter(tmp_path / "x.safetensors", layout_file([TensorSpec("a", "F32", (4,))]))
    sink = writer.sink("a")
    sink.write(b"\0" * 8)
    with pytest.raises(ValueError, match="wrote 8 of 16 bytes"):
        sink.finish()
    with pytest.raises(ValueError, match="never written"):
        writer.close()


def _good_file(tmp_path: Path) -> Path:
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(4, 4), "b": torch.zeros(2, dtype=torch.int8)}, path, metadata={"format": "pt"})
    return path


def test_read_header_matches_safetensors(tmp_path):
    header = read_header(_good_file(tmp_path))
    assert header.metadata == {"format": "pt"}
    assert {n: (e.dtype, e.shape, e.nbytes) for n, e in header.tensors.items()} == {
        "a": ("F32", (4, 4), 64), "b": ("I8", (2,), 2)}


def _rewrite_header(path: Path, mutate) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    mutate(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])


@pytest.mark.parametrize("damage, match", [
    (lambda p: p.write_bytes(p.read_bytes()[:-10]), "data ends at byte"),
    (lambda p: p.write_bytes(p.read_bytes()[:5]), "too short"),
    (lambda p: p.write_bytes(struct.pack("<Q", 10**6) + p.read_bytes()[8:]), "header says"),
    (lambda p: p.write_bytes(p.read_bytes()[:8] + b"{not json" + p.read_bytes()[17:]), "not valid JSON"),
    (lambda p: _rewrite_header(p, lambda h: h["a"].update(dtype="Q9")), "unsupported dtype"),
    (lambda p: _rewrite_header(p, lambda h: h["a"].update(shape=[4, 5])), "spans 64 bytes"),
    (lambda p: _rewrite_header(p, lambda h: h["b"].update(data_offsets=[65, 67])), "starts at byte"),
])
def test_read_header_rejects_damage(tmp_path, damage, match):
    path = _good_file(tmp_path)
    damage(path)
    with pytest.raises(CorruptCheckpointError, match=match):
        read_header(path)


def test_atomic_dir_renames_on_success_and_vanishes_on_error(tmp_path):
    out = tmp_path / "deep" / "er" / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "f").write_text("x")
        assert not out.exists()
    assert (out / "f").read_text() == "x"
    with pytest.raises(KeyboardInterrupt), atomic_output_dir(tmp_path / "new" / "out2") as tmp:
        (tmp / "f").write_text("x")
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep"]  # no temp folder, no created parent left


def test_atomic_overwrite_keeps_old_until_new_is_complete(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(RuntimeError), atomic_output_dir(out, overwrite=True):
        raise RuntimeError("boom")
    assert (out / "old").read_text() == "old"
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["new"]


def test_output_location_rules(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(OutputError, match="inside SOURCE"):
        check_output_location(src / "out", source=src, overwrite=False)
    with pytest.raises(OutputError, match="contains SOURCE"):
        check_output_location(tmp_path, source=src, overwrite=True)
    with pytest.raises(OutputError, match="--overwrite"):
        check_output_location(src, source=None, overwrite=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="not a folder"):
        check_output_location(tmp_path / "file", source=None, overwrite=True)


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "disk is full"), (errno.EFBIG, "file size limit"),
                                          (errno.EACCES, "permission denied")])
def test_write_errors_say_what_to_do(code, words):
    error = write_error(Path("/x/model.safetensors"), OSError(code, os.strerror(code)))
    assert isinstance(error, WriteError) and isinstance(error, OSError)
    assert words in str(error) and "\n" not in str(error) and "Nothing was written" in str(error)
