"""Token merging (sd/tome.py) against a plain-Python bipartite soft matching, hand-made merges, and its guarantees:
identity at ratio 0, nothing lost on identical tokens, any batch, per-image matching, determinism, bf16."""

import pytest
import torch

from sd.tome import _destinations, token_merging


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reference(x: torch.Tensor, dst: list[int], ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's tokens x (N, C) merged and unmerged by the paper's recipe, token by token, in float64."""
    N = len(x)
    src = [p for p in range(N) if p not in dst]
    r = min(int(N * ratio), len(src))
    unit = x.double() / x.double().norm(dim=-1, keepdim=True)
    best = [max(((unit[s] @ unit[d]).item(), -j) for j, d in enumerate(dst)) for s in src]  # (similarity, -first j)
    merged = sorted(range(len(src)), key=lambda i: -best[i][0])[:r]  # sorted() is stable: ties to the first source
    groups = {d: [d] for d in dst}
    for i in merged:
        groups[dst[-best[i][1]]].append(src[i])
    kept = [src[i] for i in range(len(src)) if i not in merged]
    out = torch.stack([x[p].double() for p in kept] + [x[groups[d]].double().mean(0) for d in dst])  # (N - r, C)
    back = torch.empty(N, x.shape[1], dtype=torch.double)
    for k, p in enumerate(kept):
        back[p] = out[k]
    for j, d in enumerate(dst):
        back[groups[d]] = out[len(kept) + j]
    return out, back


@pytest.mark.parametrize("height,width,ratio,seed", [(6, 8, 0.4, None), (6, 8, 0.4, 3), (5, 7, 0.3, 1),
                                                     (1, 9, 0.5, 2), (3, 1, 0.4, None), (4, 4, 0.9, 4)])
def test_matches_reference(height, width, ratio, seed):
    x = torch.randn(2, height * width, 5, generator=seeded(10))
    merge, unmerge = token_merging(x, height, width, ratio, None if seed is None else seeded(seed))
    dst = _destinations(height, width, 2, None if seed is None else seeded(seed), x.device).tolist()
    merged = merge(x)
    restored = unmerge(merged)
    for b in range(2):
        out, back = reference(x[b], dst, ratio)
        assert torch.allclose(merged[b].double(), out, atol=1e-6)
        assert torch.allclose(restored[b].double(), back, atol=1e-6)
        untouched = (back == x[b].double()).all(-1)  # kept sources and destinations nothing merged into: exact
        assert torch.equal(restored[b][untouched], x[b][untouched])
        assert not untouched.all()  # and something did merge


@pytest.mark.parametrize("height,width,ratio,expected", [(8, 8, 0.5, 32), (8, 8, 0.25, 48), (5, 7, 0.5, 18),
                                                         (4, 4, 0.9, 4), (2, 2, 0.8, 1), (64, 64, 0.5, 2048)])
def test_token_count(height, width, ratio, expected):
    x = torch.randn(1, height * width, 4, generator=seeded())
    merge, unmerge = token_merging(x, height, width, ratio, seeded())
    assert merge(x).shape == (1, expected, 4)  # N - int(N * ratio), at most all the sources (4x4: 12; 2x2: 3)
    assert unmerge(merge(x)).shape == x.shape


def test_destinations_one_per_cell_random_within_it():
    height, width = 5, 7  # 3 x 4 cells; the last row of cells is 1 pixel high, the last column 1 pixel wide
    assert _destinations(height, width, 2, None, "cpu").tolist() == [0, 2, 4, 6, 14, 16, 18, 20, 28, 30, 32, 34]
    seen = set()
    for seed in range(40):
        dst = _destinations(height, width, 2, seeded(seed), "cpu")
        y, x = dst // width, dst % width
        assert torch.equal(y // 2 * 4 + x // 2, torch.arange(12))  # exactly one in each cell, in cell order
        full = (y < 4) & (x < 6)  # the 2 x 3 full cells
        seen.update(zip((y[full] % 2).tolist(), (x[full] % 2).tolist()))
    assert seen == {(0, 0), (0, 1), (1, 0), (1, 1)}  # every offset of a full cell gets drawn, row and column apart


def test_ratio_zero_is_identity():
    x = torch.randn(2, 48, 5, generator=seeded())
    for ratio, stride in [(0, 2), (0.0, 2), (0.01, 2), (0.5, 1)]:  # r = 0; stride 1: all destinations, no sources
        merge, unmerge = token_merging(x, 6, 8, ratio, seeded(), stride=stride)
        assert merge(x) is x and unmerge(x) is x


def test_hand_made_merges():
    # One row of 4: cells [0, 1] and [2, 3], destinations 0 and 2 (top-left); token 1 is nearest 2, token 3 nearest 0.
    x = torch.tensor([[[1.0, 0.0], [0.1, 1.0], [0.0, 1.0], [1.0, 0.2]]])
    merge, unmerge = token_merging(x, 1, 4, 0.5)
    assert torch.allclose(merge(x), torch.tensor([[[1.0, 0.1], [0.05, 1.0]]]))
    assert torch.allclose(unmerge(merge(x)), torch.tensor([[[1.0, 0.1], [0.05, 1.0], [0.05, 1.0], [1.0, 0.1]]]))
    # r = 1: only the most similar pair merges (1 -> 2, cosine 0.995 beats 3 -> 0, 0.981); kept sources come first.
    merge, _ = token_merging(x, 1, 4, 0.25)
    assert torch.allclose(merge(x), torch.tensor([[[1.0, 0.2], [1.0, 0.0], [0.05, 1.0]]]))
    # The matching is x's, applied to other tokens of any width: a 2x2 image, destination 0, and 3 channels.
    x = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]]])
    t = torch.arange(12.0).view(1, 4, 3)
    merge, _ = token_merging(x, 2, 2, 0.5)  # r = 2: tokens 1 (cos 0.99) and 2 (cos 0) join 0; 3 (cos -1) is kept
    assert torch.allclose(merge(t), torch.stack([t[0, 3], t[0, :3].mean(0)])[None])


@pytest.mark.parametrize("seed", [None, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identical_tokens_lose_nothing(seed, dtype):
    rows = torch.randn(4, 8, 16, generator=seeded(1))  # (H / 2, W, C)
    x = rows.repeat_interleave(2, dim=0).view(1, 64, 16).to(dtype)  # rows 2k and 2k+1 equal: 8x8 image
    merge, unmerge = token_merging(x, 8, 8, 0.25, None if seed is None else seeded(seed))
    assert merge(x).shape == (1, 48, 16)  # each cell's twin of its destination merged into it
    assert torch.equal(unmerge(merge(x)), x)


@pytest.mark.parametrize("B", [1, 3])
def test_each_image_matched_on_its_own(B):
    x = torch.randn(B, 35, 6, generator=seeded(2))
    merge, unmerge = token_merging(x, 5, 7, 0.4, seeded(7))
    merged = merge(x)
    for b in range(B):  # alone, with the same random destinations
        merge_b, unmerge_b = token_merging(x[b:b + 1], 5, 7, 0.4, seeded(7))
        assert torch.equal(merge_b(x[b:b + 1]), merged[b:b + 1])
        assert torch.equal(unmerge_b(merged[b:b + 1]), unmerge(merged)[b:b + 1])
    perm = torch.arange(B).flip(0)
    merge_p, unmerge_p = token_merging(x[perm], 5, 7, 0.4, seeded(7))
    assert torch.equal(merge_p(x[perm]), merged[perm])
    assert torch.equal(unmerge_p(merged[perm]), unmerge(merged)[perm])


@pytest.mark.parametrize("seed", [None, 3])
def test_deterministic(seed):
    x = torch.randn(2, 64, 8, generator=seeded())
    results = [token_merging(x, 8, 8, 0.5, None if seed is None else seeded(seed))[0](x) for _ in range(2)]
    assert torch.equal(*results)
    other = token_merging(x, 8, 8, 0.5, seeded(4))[0](x)
    assert not torch.equal(other, results[0])  # another draw of destinations, another merge


@pytest.mark.parametrize("ratio", [float("nan"), float("inf"), -0.1, 1, 1.5, "0.5", True, None])
def test_bad_ratio(ratio):
    x = torch.randn(1, 16, 4)
    with pytest.raises(ValueError, match=r"^ratio must be a finite number in \[0, 1\) \(0: off, e.g. 0.5\), got .+$"):
        token_merging(x, 4, 4, ratio)


@pytest.mark.parametrize("height,width", [(4, 5), (0, 16), (16.0, 1)])
def test_bad_size(height, width):
    with pytest.raises(ValueError, match=r"^height x width must be positive and equal the token count N = 16, "):
        token_merging(torch.randn(1, 16, 4), height, width, 0.5)


def test_bad_token_shapes():
    with pytest.raises(ValueError, match=r"^token_merging needs tokens \(B, N, C\), got shape \(16, 4\)$"):
        token_merging(torch.randn(16, 4), 4, 4, 0.5)
    merge, unmerge = token_merging(torch.randn(2, 16, 4), 4, 4, 0.5)
    with pytest.raises(ValueError, match=r"^merge needs tokens \(2, 16, C'\), got \(1, 16, 4\)$"):
        merge(torch.randn(1, 16, 4))
    with pytest.raises(ValueError, match=r"^unmerge needs tokens \(2, 8, C'\), got \(2, 16, 4\)$"):
        unmerge(torch.randn(2, 16, 4))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    x = torch.randn(2, 48, 8, generator=seeded()).to(dtype)
    merge, unmerge = token_merging(x, 6, 8, 0.5, seeded(1))
    merge32, unmerge32 = token_merging(x.float(), 6, 8, 0.5, seeded(1))  # the same matching: it is done in float32
    merged = merge(x)
    assert merged.dtype == dtype and unmerge(merged).dtype == dtype
    assert torch.equal(merged, merge32(x.float()).to(dtype))  # means taken in float32, rounded once
    assert torch.equal(unmerge(merged), unmerge32(merged.float()).to(dtype))


def test_inputs_unchanged():
    x = torch.randn(2, 48, 8, generator=seeded())
    t = torch.randn(2, 48, 3, generator=seeded(1))
    x0, t0 = x.clone(), t.clone()
    merge, unmerge = token_merging(x, 6, 8, 0.5, seeded())
    merged = merge(t)
    merged0 = merged.clone()
    unmerge(merged)
    assert torch.equal(x, x0) and torch.equal(t, t0) and torch.equal(merged, merged0)
