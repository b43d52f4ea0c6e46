"""scripts/convert_llama2c.py and scripts/shard_checkpoint.py on stories260K."""

import json
import shutil
import struct

import pytest
import torch

from scripts.convert_llama2c import convert_llama2c, main as convert_main, params_for
from scripts.shard_checkpoint import shard_checkpoint
from llama.model import ModelArgs


@pytest.fixture(scope="module")
def llama2c_bin(stories_dir):
    path = stories_dir / "llama2c" / "stories260K.bin"
    assert path.is_file(), f"{path} missing"
    return path


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_convert_reproduces_shipped_checkpoint(tmp_path, stories_dir, llama2c_bin):
    out = convert_llama2c(llama2c_bin, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.00.pth", "params.json"]  # no temp dir left
    ours, shipped = load(out / "consolidated.00.pth"), load(stories_dir / "consolidated.00.pth")
    assert set(ours) == set(shipped)
    for key, tensor in shipped.items():
        assert ours[key].dtype == tensor.dtype and ours[key].shape == tensor.shape, key
        assert torch.equal(ours[key], tensor), key
    params = json.loads((out / "params.json").read_text())
    assert params == json.loads((stories_dir / "params.json").read_text())
    assert ModelArgs(**params).hidden_dim == shipped["layers.0.feed_forward.w1.weight"].shape[0] == 172


def test_convert_cli_copies_tokenizer_into_existing_dir(tmp_path, stories_dir, llama2c_bin, capsys):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "params.json").write_text("stale")
    convert_main([str(llama2c_bin), str(out), "--tokenizer", str(stories_dir / "tokenizer.model")])
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.00.pth", "params.json", "tokenizer.model"]
    assert (out / "params.json").read_bytes() == (stories_dir / "params.json").read_bytes()
    assert (out / "tokenizer.model").read_bytes() == (stories_dir / "tokenizer.model").read_bytes()


def test_convert_truncated_file(tmp_path, llama2c_bin):
    data = llama2c_bin.read_bytes()
    bad = tmp_path / "truncated.bin"
    bad.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=rf"is {len(data) - 100} bytes but its header .* implies {len(data)} "
                                         rf"bytes; the file is truncated"):
        convert_llama2c(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_convert_bad_headers(tmp_path, llama2c_bin):
    short = tmp_path / "short.bin"
    short.write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match=r"shorter than the 28-byte llama2.c header"):
        convert_llama2c(short, tmp_path / "out")
    versioned = tmp_path / "v1.bin"
    versioned.write_bytes(struct.pack("<2i", 0x616B3432, 1) + b"\0" * 248)
    with pytest.raises(ValueError, match=r"versioned llama2.c export .* --version 0"):
        convert_llama2c(versioned, tmp_path / "out")
    zero = tmp_path / "zero.bin"
    zero.write_bytes(struct.pack("<7i", 64, 172, 0, 8, 4, 512, 512))
    with pytest.raises(ValueError, match=r"invalid llama2.c header \(n_layers=0\)"):
        convert_llama2c(zero, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"nope.bin not found"):
        convert_llama2c(tmp_path / "nope.bin", tmp_path / "out")


def test_convert_separate_classifier(tmp_path, llama2c_bin):
    """A negative vocab_size in the header means a wcls matrix follows the RoPE tables."""
    data = bytearray(llama2c_bin.read_bytes())
    header = list(struct.unpack_from("<7i", data))
    dim, vocab = header[0], header[5]
    header[5] = -vocab
    struct.pack_into("<7i", data, 0, *header)
    wcls = torch.arange(vocab * dim, dtype=torch.float32).reshape(vocab, dim)
    path = tmp_path / "sep.bin"
    path.write_bytes(bytes(data) + struct.pack(f"<{wcls.numel()}f", *wcls.flatten().tolist()))
    sd = load(convert_llama2c(path, tmp_path / "out") / "consolidated.00.pth")
    assert torch.equal(sd["output.weight"], wcls)
    assert not torch.equal(sd["output.weight"], sd["tok_embeddings.weight"])


@pytest.mark.parametrize("dim, hidden", [(64, 172), (4096, 11008), (288, 768), (64, 100), (64, 171), (8192, 28672)])
def test_params_for_reproduces_hidden_dim(dim, hidden):
    params = params_for(dim, hidden, 2, 8, 4, 512)
    assert ModelArgs(**params).hidden_dim == hidden
    assert ("ffn_dim_multiplier" in params) == (hidden in (100, 171, 28672))


def test_shard_checkpoint_splits_along_the_parallel_dims(tmp_path, stories_dir):
    out = shard_checkpoint(stories_dir, tmp_path / "mp2", 2)
    assert sorted(p.name for p in out.iterdir()) == [
        "consolidated.00.pth", "consolidated.01.pth", "params.json", "tokenizer.model"]
    full = load(stories_dir / "consolidated.00.pth")
    shards = [load(out / f"consolidated.0{r}.pth") for r in range(2)]
    assert all(set(s) == set(full) for s in shards)
    for key, t in full.items():
        if key.endswith(("wo.weight", "w2.weight")):
            dim = 1
        elif key.endswith("norm.weight"):
            assert all(torch.equal(s[key], t) for s in shards), key
            continue
        else:
            dim = 0
        assert torch.equal(torch.cat([s[key] for s in shards], dim=dim), t), key
        assert shards[0][key].shape[dim] == t.shape[dim] // 2, key
    assert shards[0]["layers.0.attention.wk.weight"].shape == (16, 64)  # 2 of 4 KV heads of size 8
    assert (out / "params.json").read_bytes() == (stories_dir / "params.json").read_bytes()


def test_shard_checkpoint_errors(tmp_path, stories_dir):
    with pytest.raises(ValueError, match=r"n_heads=8, n_kv_heads=4, hidden_dim=172, vocab_size=512 not divisible "
                                         r"by 3; shard counts that work: \[1, 2, 4\]"):
        shard_checkpoint(stories_dir, tmp_path / "mp3", 3)
    with pytest.raises(ValueError, match=r"n_kv_heads=4, hidden_dim=172 not divisible by 8"):
        shard_checkpoint(stories_dir, tmp_path / "mp8", 8)
    assert not (tmp_path / "mp3").exists() and not (tmp_path / "mp8").exists()
    two = tmp_path / "two"
    two.mkdir()
    for name in ("consolidated.00.pth", "consolidated.01.pth", "params.json"):
        shutil.copyfile(stories_dir / ("params.json" if name == "params.json" else "consolidated.00.pth"), two / name)
    with pytest.raises(ValueError, match=r"holds 2 checkpoint files .* single-file checkpoint"):
        shard_checkpoint(two, tmp_path / "out", 2)
