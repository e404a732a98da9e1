import pytest
import torch

from fasq.core.config import PQConfig, RTNConfig
from fasq.core.format import layer_size, pack_codes, packed_row_bytes, unpack_codes
from fasq.core.module import PQLinear
from fasq.core.ops import code_dtype


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8, 9, 12, 15, 16])
@pytest.mark.parametrize("M", [1, 7, 64])
def test_pack_round_trip(bits, M):
    g = torch.Generator().manual_seed(bits * 100 + M)
    K = 1 << bits
    codes = torch.randint(0, K, (13, M), generator=g).to(code_dtype(K) if K <= 32768 else torch.int32)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (13, packed_row_bytes(M, bits))
    assert torch.equal(unpack_codes(packed, bits, M, codes.dtype), codes)


def test_pack_bit_order_is_little_endian():
    # codes 1, 2, 3 at 2 bits -> bits 10 01 11 (LSB first) -> byte 0b00_11_10_01 = 0x39
    packed = pack_codes(torch.tensor([[1, 2, 3]]), 2)
    assert packed.tolist() == [[0b00111001]]


def test_8_bit_fast_path_matches_the_general_packing():

    codes = torch.randint(0, 256, (9, 11), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    fast = pack_codes(codes, 8)
    # the general bit loop, reached by packing 8-bit codes as two 4-bit halves per byte
    lo, hi = codes & 15, codes >> 4
    general = pack_codes(torch.stack([lo, hi], -1).view(9, 22), 4)
    assert torch.equal(fast, general) and torch.equal(unpack_codes(fast, 8, 11, torch.uint8), codes)


def test_size_accounting_pq_by_hand():
    # W[576, 576], d=2, K=256, a codebook per 96 subspaces, fp16 scales per 96 columns (the default)
    m = PQLinear(576, 576, PQConfig(d=2, K=256), device="meta")
    s = layer_size(m)
    assert s.codes == 576 * 288  # 8 bits per code, 288 codes per row
    assert s.codebooks == 3 * 256 * 2 * 2
    assert s.scales == 576 * 6 * 2
    assert s.bits_per_weight == pytest.approx(8 * (576 * 288 + 3072 + 6912) / (576 * 576))
    assert PQLinear(576, 576, PQConfig(d=2, K=256, scale_group=0), device="meta").scales.shape == (576, 1)


def test_size_accounting_odd_bits_and_groups_by_hand():
    # d=4, K=1024 (10 bits), one codebook per 6 subspaces, scales per 96 columns
    cfg = PQConfig(d=4, K=1024, codebook_scope="group", codebook_group=6, scale="minmax", scale_group=96)
    m = PQLinear(576, 192, cfg, device="meta")
    s = layer_size(m)
    assert s.codes == 192 * (144 * 10 // 8)
    assert s.codebooks == (144 // 6) * 1024 * 4 * 2
    assert s.scales == 2 * 192 * 6 * 2  # scales + offsets
    assert m.codes.dtype == torch.int16


def test_size_accounting_rtn_matches_nominal_bits():
    s = layer_size(PQLinear(576, 1536, RTNConfig(bits=4, group_size=64), device="meta"))
    # 4 bits + (16-bit scale + 16-bit minimum) / 64, plus the 16-entry grid codebook
    assert s.bits_per_weight == pytest.approx(4 + 32 / 64 + 16 * 16 / (576 * 1536))
