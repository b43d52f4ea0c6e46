"""Codecs: how a compressed cache stores each kept token's key and value (full precision, int8, int4).

A codec is a small class over the packed store. It names the per-slot fields that replace the full-precision
keys and values (codes and per-token scales), so the store appends, compacts and re-groups them like any other
field and knows nothing of quantisation; a codec may keep per-layer side buffers (int4: per-block key scales
and the full-precision window of recent tokens). Attention reads a coded group through the codec's reader, a
chunk of columns at a time (`llama.attention.KVGroup.codes`).

When quantisation happens (every codec, so every method composes with it):

* While any sequence of the batch still reads its prompt, a layer holds full precision, so the method's
  statistics (FastGen's profiling) come from full-precision keys, and the prompt-end compaction drops tokens
  before anything is quantised. When the last prompt ends, each layer is *sealed* right after its compaction:
  the kept tokens become codes and the full-precision fields are freed.
* After that, new tokens are encoded as they are appended (int8), or enter the full-precision window and are
  quantised when they leave it (int4).

Codecs:

* `FullPrecision` ("none"): keys and values in the model's dtype; never seals.
* `Int8` ("int8"): per token, symmetric: codes in [-127, 127] and one float32 scale per (token, KV head) for
  keys and one for values. Both scales fold out of the matmuls (q . (s c) = s (q . c), p (s c) = (p s) c), so
  attention converts codes to floats and nothing else.
* `Int4` ("int4", KIVI-style): keys per channel over blocks of G positions ([jG, (j+1)G)), values per token,
  both asymmetric (min and step), two codes per byte; the most recent tokens stay in full precision. A block is
  quantised once all its positions are at least `residual` tokens old; its per-channel range is taken over the
  block's tokens the segment still holds then (tokens evicted earlier do not widen it). Later evictions drop a
  quantised token's codes like any slot; the block's scales stay valid for the rest (they are indexed by
  position, pos // G), so eviction and quantisation never wait on each other. The per-block tables and the
  window are side buffers of the codec, counted in the cache's bytes.
"""

from typing import Dict, List, Optional, Tuple

import torch

from llama.attention import EMPTY_POS

#: Most bytes of one dequantised chunk (all segments of a group), in a buffer reused across chunks, groups and
#: layers. On a CPU the per-op cost dominates smaller chunks: at 8k SmolLM2 contexts, 256 KiB chunks cost 1.2x
#: the full-precision attention and 4 MiB ones (most groups in one chunk) 1.0x (README, "Quantised storage").
CHUNK_BYTES = 4 << 20

FieldSpec = Tuple[torch.dtype, float, Tuple[int, ...]]


class Codec:
    """Interface, and full precision (the identity): the store keeps fields 'k' and 'v'.

    A codec instance serves one generation (one cache); per-layer state is created on first use.
    """

    name = "none"

    def __init__(self, chunk_bytes: int = CHUNK_BYTES) -> None:
        """
        Args:
            chunk_bytes: bytes of one dequantised chunk of a group (attention reads codes in such chunks).
        """
        self.chunk_bytes = chunk_bytes
        self.state: Dict[int, Dict] = {}
        self._scratch: Optional[torch.Tensor] = None

    # --- what the store holds ---------------------------------------------------------------------------------

    def fields(self, head_dim: int) -> Dict[str, FieldSpec]:
        """Per-slot fields of a sealed store: name -> (dtype, empty value, row shape)."""
        return {}

    code_fields: Tuple[str, ...] = ("k", "v")
    scale_fields: Tuple[str, ...] = ()

    def token_bytes(self, head_dim: int, element_size: int) -> int:
        """Bytes of one kept token (key and value) in the store once sealed."""
        return 2 * head_dim * element_size

    @staticmethod
    def sealed(store) -> bool:
        return "k" not in store.buf

    # --- hooks the cache calls ----------------------------------------------------------------------------------

    def seal(self, layer_id: int, store, end: int) -> None:
        """Turns the layer's full-precision keys and values (positions < end) into codes and frees them."""

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Per-slot field values of new tokens once sealed; k, v: (rows, head_dim)."""
        return {"k": k, "v": v}

    def after_append(self, layer_id: int, store, xk: torch.Tensor, xv: torch.Tensor, start: int) -> None:
        """Once sealed, after the store took the new slots; xk, xv: (n_seg, seqlen, head_dim)."""

    def readers(self, layer_id: int, store) -> List:
        """The `KVGroup.codes` reader of each group of a sealed store."""
        raise NotImplementedError

    # --- accounting -------------------------------------------------------------------------------------------

    def side_bytes(self, layer_id: int) -> Tuple[int, int]:
        """Allocated bytes of side buffers: (scales, residual window)."""
        return 0, 0

    def side_used_bytes(self, layer_id: int, length: int) -> int:
        """Bytes of side buffers that hold data for positions < length (per-block scales, the window)."""
        return 0

    def nbytes(self, layer_id: int, store, length: int, head_dim: int, element_size: int) -> Dict[str, int]:
        """Allocated bytes of a layer: codes (full-precision keys and values for 'none' or before sealing),
        scales, residual window, and `kept` (the kept tokens' bytes plus side data in use)."""
        kept = sum(store.lengths)
        if not self.sealed(store):
            return {"codes": store.nbytes(("k", "v")), "scales": 0, "residual": 0,
                    "kept": kept * 2 * head_dim * element_size}
        scales, residual = self.side_bytes(layer_id)
        return {"codes": store.nbytes(self.code_fields), "scales": store.nbytes(self.scale_fields) + scales,
                "residual": residual,
                "kept": kept * self.token_bytes(head_dim, element_size) + self.side_used_bytes(layer_id, length)}

    # --- helpers ----------------------------------------------------------------------------------------------

    def _install(self, store, head_dim: int) -> None:
        for name, (dtype, fill, shape) in self.fields(head_dim).items():
            store.add_field(name, dtype, fill, shape)

    def scratch(self, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
        """A buffer reused by every chunk read (one read in flight at a time)."""
        t = self._scratch
        if t is None or t.numel() < numel or t.dtype != dtype or t.device != device:
            t = self._scratch = torch.empty(numel, dtype=dtype, device=device)
        return t[:numel]

    def chunk_columns(self, n: int, head_dim: int) -> int:
        """Columns per dequantised chunk of a group of n segments."""
        return max(1, self.chunk_bytes // max(1, n * head_dim * 4))


FullPrecision = Codec


# --- quantisers (pure functions) ------------------------------------------------------------------------------


def quantise_int8(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per row: x ~ codes * scale.

    Args:
        x: (..., d).

    Returns:
        codes (..., d) int8 in [-127, 127]; scale (...) float32 = max |x| / 127 (0 for a zero row).
    """
    x = x.float()
    scale = torch.linalg.vector_norm(x, float("inf"), dim=-1) / 127
    # a zero row divides by the smallest normal float: codes 0, scale 0
    codes = torch.round(x / scale.clamp(min=torch.finfo(torch.float32).tiny)[..., None]).clamp_(-127, 127)
    return codes.to(torch.int8), scale


def quantise_uint4(x: torch.Tensor, lo: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Asymmetric 4-bit codes of x ~ lo + codes * step (lo, step broadcast to x), in [0, 15], as uint8."""
    q = torch.round((x.float() - lo) / torch.where(step > 0, step, 1.0))
    return q.clamp_(0, 15).to(torch.uint8)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(..., d) codes in [0, 15] -> (..., d / 2) bytes: channel 2i in the low nibble, 2i + 1 in the high one."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`: (..., d / 2) bytes -> (..., d) codes."""
    return torch.stack((packed & 15, packed >> 4), -1).flatten(-2)


def minmax_step(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """The 4-bit step of a range: (hi - lo) / 15 (0 when the range is a single value)."""
    return (hi - lo) / 15


# --- int8 ------------------------------------------------------------------------------------------------------


class Int8(Codec):
    """Per-token symmetric int8 keys and values, one float32 scale each per (token, KV head).

    Fields: `kvq` (2, head_dim) int8 codes and `kvs` (2,) float32 scales, key then value: one field each, so an
    append writes two fields, not four.
    """

    name = "int8"
    code_fields = ("kvq",)
    scale_fields = ("kvs",)

    def fields(self, head_dim: int) -> Dict[str, FieldSpec]:
        return {"kvq": (torch.int8, 0, (2, head_dim)), "kvs": (torch.float32, 0.0, (2,))}

    def token_bytes(self, head_dim: int, element_size: int) -> int:
        return 2 * head_dim + 2 * 4

    def seal(self, layer_id: int, store, end: int) -> None:
        k, v = store.buf["k"], store.buf["v"]
        self.state[layer_id] = {"dtype": k.dtype}
        self._install(store, k.shape[1])
        for name, t in self.encode(k, v).items():
            store.buf[name].copy_(t)
        store.drop_field("k")
        store.drop_field("v")

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> Dict[str, torch.Tensor]:
        codes, scale = quantise_int8(torch.stack((k, v), 1))  # one pass for both (a decode step's few ops)
        return {"kvq": codes, "kvs": scale}

    def readers(self, layer_id: int, store) -> List:
        dtype = self.state[layer_id]["dtype"]
        return [_Int8Reader(self, q[:, :, 0], q[:, :, 1], s[:, :, 0], s[:, :, 1], dtype)
                for q, s in zip(store.field("kvq"), store.field("kvs"))]


class _Int8Reader:
    """Codes of one group as floats, a chunk of columns at a time, in the codec's reused buffer."""

    def __init__(self, codec: Int8, kq, vq, ks, vs, dtype):
        self.codec, self.kq, self.vq, self.key_scale, self.value_scale, self.dtype = codec, kq, vq, ks, vs, dtype
        self.chunk = codec.chunk_columns(kq.shape[0], kq.shape[2])

    def _read(self, codes: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        n, _, d = codes.shape
        buf = self.codec.scratch(n * self.chunk * d, self.dtype, codes.device)
        return buf[: n * (hi - lo) * d].view(n, hi - lo, d).copy_(codes[:, lo:hi])

    def keys(self, lo: int, hi: int) -> torch.Tensor:
        return self._read(self.kq, lo, hi)

    def values(self, lo: int, hi: int) -> torch.Tensor:
        return self._read(self.vq, lo, hi)


# --- int4 ------------------------------------------------------------------------------------------------------


class Int4(Codec):
    """KIVI-style 4-bit codes: keys per channel over blocks of `group` positions, values per token, and a
    full-precision window of at least the `residual` most recent tokens.

    Per layer state: `r0` (positions < r0 are quantised; a multiple of `group`), the window `rk`, `rv`
    ((n_seg, cap, head_dim) in the model's dtype, row t = position r0 + t) and the key table `kp`
    ((n_seg, blocks, 2, head_dim) float32: step and minimum per channel; row j = positions [j G, (j + 1) G)).
    """

    name = "int4"
    code_fields = ("kq", "vq")
    scale_fields = ("vlo", "vstep")

    def __init__(self, group: int = 32, residual: int = 128, chunk_bytes: int = CHUNK_BYTES):
        """
        Args:
            group: G, positions per key block (KIVI: 32).
            residual: R, recent tokens kept in full precision (KIVI: 128); the window holds R to R + G - 1.
            chunk_bytes: see `Codec`.
        """
        super().__init__(chunk_bytes)
        if group < 1 or residual < 0:
            raise ValueError(f"int4 codec: group={group} must be >= 1 and residual={residual} >= 0")
        self.group = group
        self.residual = residual

    def fields(self, head_dim: int) -> Dict[str, FieldSpec]:
        if head_dim % 2:
            raise ValueError(f"int4 codec packs two channels per byte: head_dim={head_dim} must be even; use int8")
        return {"kq": (torch.uint8, 0, (head_dim // 2,)), "vq": (torch.uint8, 0, (head_dim // 2,)),
                "vlo": (torch.float32, 0.0, ()), "vstep": (torch.float32, 0.0, ())}

    def token_bytes(self, head_dim: int, element_size: int) -> int:
        return head_dim + 2 * 4

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {}  # new tokens enter the window; `after_append` quantises what leaves it

    # --- sealing and the window ---------------------------------------------------------------------------------

    def seal(self, layer_id: int, store, end: int) -> None:
        k, v = store.field("k"), store.field("v")
        n_seg, head_dim, dtype, device = store.n_seg, store.buf["k"].shape[1], store.buf["k"].dtype, store.device
        r0 = self._boundary(end)
        cap = max(end - r0, self.residual + self.group)
        st = self.state[layer_id] = {
            "r0": 0, "dtype": dtype,
            "rk": torch.zeros(n_seg, cap, head_dim, dtype=dtype, device=device),
            "rv": torch.zeros(n_seg, cap, head_dim, dtype=dtype, device=device),
            "kp": torch.zeros(n_seg, 0, 2, head_dim, device=device)}
        self._install(store, head_dim)
        self._quantise(st, store, k, v, 0, r0)
        st["r0"] = r0
        for g, kg, vg, pos in zip(store.groups, k, v, store.field("pos")):  # the window, by position
            rows, cols = ((pos >= r0) & (pos != EMPTY_POS)).nonzero(as_tuple=True)
            seg, t = g.seg[rows], pos[rows, cols].long() - r0
            st["rk"][seg, t], st["rv"][seg, t] = kg[rows, cols], vg[rows, cols]
        store.drop_field("k")
        store.drop_field("v")

    def _boundary(self, end: int) -> int:
        """First position of the window after `end` positions: the blocks before it are `residual` old."""
        return max(0, (end - self.residual) // self.group * self.group)

    def after_append(self, layer_id: int, store, xk: torch.Tensor, xv: torch.Tensor, start: int) -> None:
        st = self.state[layer_id]
        end = start + xk.shape[1]
        r0 = st["r0"]
        if end - r0 > st["rk"].shape[1]:  # grow the window buffers (a long pass, or blocks still to quantise)
            for name in ("rk", "rv"):
                t = st[name]
                grown = t.new_zeros(t.shape[0], end - r0, t.shape[2])
                grown[:, : t.shape[1]] = t
                st[name] = grown
        st["rk"][:, start - r0 : end - r0] = xk
        st["rv"][:, start - r0 : end - r0] = xv
        new_r0 = self._boundary(end)
        if new_r0 <= r0:
            return
        k, v = zip(*(self._window(st, store, i) for i in range(len(store.groups))))
        self._quantise(st, store, k, v, r0, new_r0)
        for name in ("rk", "rv"):  # drop the quantised rows from the window
            t = st[name]
            t[:, : end - new_r0] = t[:, new_r0 - r0 : end - r0].clone()
        st["r0"] = new_r0

    def _window(self, st: Dict, store, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Full-precision keys and values of group i's slots from the window ((n, width, head_dim) each; rows of
        slots outside the window are arbitrary)."""
        g, pos = store.groups[i], store.field("pos")[i]
        idx = (pos.long() - st["r0"]).clamp_(0, st["rk"].shape[1] - 1)[..., None].expand(-1, -1, st["rk"].shape[2])
        return (torch.gather(st["rk"].index_select(0, g.seg), 1, idx),
                torch.gather(st["rv"].index_select(0, g.seg), 1, idx))

    def _quantise(self, st: Dict, store, k: List[torch.Tensor], v: List[torch.Tensor], lo: int, hi: int) -> None:
        """Quantises the slots with positions in [lo, hi) (whole blocks) from their full-precision rows.

        Args:
            k, v: per group, (n, width, head_dim) full-precision rows of every slot (others are ignored).
        """
        if hi <= lo:
            return
        G, nb, j0 = self.group, (hi - lo) // self.group, lo // self.group
        self._grow_tables(st, hi // G)
        for i, (g, kg, vg, pos) in enumerate(zip(store.groups, k, v, store.field("pos"))):
            inside = (pos >= lo) & (pos < hi)  # (n, width)
            blk = ((pos.long() - lo) // G).clamp_(0, nb - 1)[..., None].expand(-1, -1, kg.shape[2])
            kf = kg.float()
            kmin = torch.full((g.n, nb, kg.shape[2]), float("inf"), device=kf.device).scatter_reduce_(
                1, blk, torch.where(inside[..., None], kf, float("inf")), "amin")
            kmax = torch.full_like(kmin, float("-inf")).scatter_reduce_(
                1, blk, torch.where(inside[..., None], kf, float("-inf")), "amax")
            empty = torch.isinf(kmin)  # a block of which the segment holds no token
            kmin, kmax = kmin.masked_fill(empty, 0.0), kmax.masked_fill(empty, 0.0)
            kstep = minmax_step(kmin, kmax)
            st["kp"][g.seg, j0 : j0 + nb] = torch.stack((kstep, kmin), 2)
            kq = pack_nibbles(quantise_uint4(kf, torch.gather(kmin, 1, blk), torch.gather(kstep, 1, blk)))
            vf = vg.float()
            vlo, vstep = vf.amin(-1), minmax_step(vf.amin(-1), vf.amax(-1))
            vq = pack_nibbles(quantise_uint4(vf, vlo[..., None], vstep[..., None]))
            for name, t in (("kq", kq), ("vq", vq), ("vlo", vlo), ("vstep", vstep)):
                f = store.field(name)[i]
                f.copy_(torch.where(inside.view(inside.shape + (1,) * (f.dim() - 2)), t, f))

    @staticmethod
    def _grow_tables(st: Dict, blocks: int) -> None:
        t = st["kp"]
        if t.shape[1] < blocks:
            # grow by 1/16: the table is copied every ~L/16 positions and never holds more than L/16 spare rows
            grown = t.new_zeros(t.shape[0], max(blocks, t.shape[1] + t.shape[1] // 16 + 1), *t.shape[2:])
            grown[:, : t.shape[1]] = t
            st["kp"] = grown

    def readers(self, layer_id: int, store) -> List:
        return [_Int4Reader(self, self.state[layer_id], store, i) for i in range(len(store.groups))]

    # --- accounting -------------------------------------------------------------------------------------------

    def side_bytes(self, layer_id: int) -> Tuple[int, int]:
        st = self.state.get(layer_id)
        if st is None:
            return 0, 0
        return _nbytes(st["kp"]), sum(_nbytes(st[n]) for n in ("rk", "rv"))

    def side_used_bytes(self, layer_id: int, length: int) -> int:
        st = self.state.get(layer_id)
        if st is None:
            return 0
        n_seg, _, d = st["rk"].shape
        blocks = st["r0"] // self.group
        return 2 * n_seg * d * (blocks * 4 + (length - st["r0"]) * st["rk"].element_size())


class _Int4Reader:
    """One group's keys and values, dequantised a chunk of columns at a time; window slots from full precision.

    Per chunk: one row gather from the key table and one from each window buffer (flat indices), then one
    multiply-add per tensor; the window is selected with `where` (a data-dependent copy would synchronise).
    """

    key_scale = None
    value_scale = None

    def __init__(self, codec: Int4, st: Dict, store, i: int):
        g = store.groups[i]
        self.codec, self.st = codec, st
        self.kq, self.vq = store.field("kq")[i], store.field("vq")[i]
        self.vlo, self.vstep = store.field("vlo")[i], store.field("vstep")[i]
        self.pos = store.field("pos")[i]
        self.seg = g.seg[:, None]
        self.chunk = codec.chunk_columns(g.n, st["rk"].shape[2])

    def _window(self, name: str, pos: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        r = self.st[name]
        rows = self.seg * r.shape[1] + (pos.long() - self.st["r0"]).clamp(0, r.shape[1] - 1)
        win = r.view(-1, r.shape[2]).index_select(0, rows.flatten()).view(x.shape)
        return torch.where((pos >= self.st["r0"])[..., None], win, x)

    def keys(self, lo: int, hi: int) -> torch.Tensor:
        pos, st = self.pos[:, lo:hi], self.st
        codes = unpack_nibbles(self.kq[:, lo:hi]).float()
        kp = st["kp"]
        if kp.shape[1]:
            rows = self.seg * kp.shape[1] + (pos.long() // self.codec.group).clamp_(0, kp.shape[1] - 1)
            p = kp.view(-1, 2, kp.shape[3]).index_select(0, rows.flatten()).view(*codes.shape[:2], 2, -1)
            codes = torch.addcmul(p[:, :, 1], codes, p[:, :, 0])
        return self._window("rk", pos, codes.to(st["dtype"]))

    def values(self, lo: int, hi: int) -> torch.Tensor:
        pos = self.pos[:, lo:hi]
        codes = unpack_nibbles(self.vq[:, lo:hi]).float()
        v = torch.addcmul(self.vlo[:, lo:hi, None], codes, self.vstep[:, lo:hi, None])
        return self._window("rv", pos, v.to(self.st["dtype"]))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


CODECS = {"none": FullPrecision, "int8": Int8, "int4": Int4}


def make_codec(name: str) -> Codec:
    """A new codec instance by name: none | int8 | int4."""
    if name not in CODECS:
        raise ValueError(f"kv_quant={name!r} is not a codec; choose one of: {', '.join(CODECS)}")
    return CODECS[name]()
