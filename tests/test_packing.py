"""griffon.packing on the CPU: the two packed-document conventions, converted both ways, against
a loop written out, with documents crossing row boundaries; and the checks on cu_seqlens."""

import pytest
import torch

from griffon.packing import check_cu_seqlens, cu_seqlens_from_segment_pos, segment_pos_from_cu_seqlens, varlen_batch


def _segment_pos_rows(B: int, T: int, seed: int) -> torch.Tensor:
    """(B, T) positions of random-length documents; a row may start inside a document."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        row, pos = [], int(torch.randint(0, 5, (1,), generator=g))
        while len(row) < T:
            row.append(pos)
            pos = 0 if torch.rand(1, generator=g) < 0.15 else pos + 1
        rows.append(row)
    return torch.tensor(rows)


def _offsets_by_loop(segment_pos: torch.Tensor) -> list[int]:
    flat, out = segment_pos.flatten().tolist(), []
    T = segment_pos.shape[1]
    for i, p in enumerate(flat):
        if p == 0 or i % T == 0:  # a document start, or a row start (a piece continuing a document)
            out.append(i)
    return out + [len(flat)]


@pytest.mark.parametrize("B, T, seed", [(1, 1, 0), (2, 31, 1), (3, 64, 2), (5, 17, 3)])
def test_cu_seqlens_and_segment_pos_convert_both_ways(B, T, seed):
    seg = _segment_pos_rows(B, T, seed)
    cu = cu_seqlens_from_segment_pos(seg)
    assert cu.dtype == torch.int32 and cu.tolist() == _offsets_by_loop(seg)
    back = segment_pos_from_cu_seqlens(cu, B * T)  # (1, B*T): positions inside each piece
    want = [i - max(o for o in cu.tolist() if o <= i) for i in range(B * T)]
    assert back.tolist() == [want]
    # where no piece starts mid-document, the round trip is exact
    whole = back.view(B, T) if all(int(seg[r, 0]) == 0 for r in range(B)) else None
    if whole is not None:
        assert torch.equal(whole, seg)


def test_varlen_batch_shifts_targets_and_packs_the_rows():
    tokens = torch.arange(2 * 9).view(2, 9)
    seg = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1], [5, 6, 0, 1, 2, 3, 4, 5, 0]])
    inputs, targets, cu = varlen_batch(tokens, seg)
    assert torch.equal(inputs, tokens[:, :-1].reshape(1, -1)) and torch.equal(targets, tokens[:, 1:].reshape(1, -1))
    assert cu.tolist() == [0, 3, 7, 8, 10, 16]


@pytest.mark.parametrize(
    "cu, total, message",
    [
        ([0, 3, 5], 6, "offsets from 0 to the stream length 6"),
        ([1, 3, 6], 6, "offsets from 0"),
        ([0], 0, "offsets from 0"),
        ([0, 3, 3, 6], 6, "strictly increasing"),
        ([[0, 6]], 6, "offsets from 0"),
    ],
)
def test_bad_cu_seqlens_are_refused(cu, total, message):
    with pytest.raises(ValueError, match=message):
        check_cu_seqlens(torch.tensor(cu), total)
    check_cu_seqlens(torch.tensor([0, 2, 6]), 6)
