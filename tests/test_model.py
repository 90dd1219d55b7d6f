"""Model behaviour: decode consistency, packed documents, input errors, dtypes."""

import pytest
import torch

from griffon import Griffon, get_preset

from segments import doc_positions

TOL = 1e-5


@pytest.mark.parametrize("preset", ["griffin-tiny", "hawk-tiny", "mqa-tiny"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_any_split_into_chunks_and_steps_gives_full_forward_logits(preset, seed):
    model = Griffon(get_preset(preset)).eval()
    B, T = 2, 53  # griffin-tiny's window is 16: several windows long
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (B, T), generator=g)
    seg = torch.stack([doc_positions(T, [19]), doc_positions(T, [5, 40])])
    # Random chunk lengths, many of them single steps.
    cuts, t = [0], 0
    while t < T:
        t = min(T, t + int(torch.randint(1, 12, (1,), generator=g)) if torch.rand(1, generator=g) < 0.5 else t + 1)
        cuts.append(t)
    with torch.no_grad():
        want, _ = model(tokens, seg)
        cache, outs = None, []
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            logits, cache = model(tokens[:, a:b], seg[:, a:b], cache=cache, return_cache=True)
            outs.append(logits)
    assert (torch.cat(outs, 1) - want).abs().max() <= TOL


@pytest.mark.parametrize("preset", ["griffin-tiny", "mqa-tiny"])
def test_query_blocks_do_not_change_attention(preset, monkeypatch):
    model = Griffon(get_preset(preset)).eval()
    tokens = torch.randint(0, 256, (2, 300))
    seg = torch.stack([doc_positions(300, [40, 211]), doc_positions(300, [])])
    with torch.no_grad():
        want, _ = model(tokens, seg)
        monkeypatch.setattr("griffon.nn.attention._QUERY_BLOCK", 7)
        got, _ = model(tokens, seg)
    assert (got - want).abs().max() <= TOL


@pytest.mark.parametrize("preset", ["griffin-tiny", "hawk-tiny", "mqa-tiny"])
def test_packed_documents_equal_separate_runs(preset):
    model = Griffon(get_preset(preset)).eval()
    lengths = [7, 30, 13]
    docs = [torch.randint(0, 256, (1, n)) for n in lengths]
    packed = torch.cat(docs, 1)
    seg = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        got, _ = model(packed, seg)
        want = torch.cat([model(d)[0] for d in docs], 1)
    assert (got - want).abs().max() <= TOL


def test_default_segment_pos_continues_the_cache():
    model = Griffon(get_preset("griffin-tiny")).eval()
    tokens = torch.randint(0, 256, (1, 30))
    with torch.no_grad():
        want, _ = model(tokens)
        _, cache = model(tokens[:, :20], return_cache=True)
        got, _ = model(tokens[:, 20:], cache=cache)
    assert (got - want[:, 20:]).abs().max() <= TOL


def test_local_attention_cache_is_fixed_size_and_global_grows():
    for preset, grows in [("griffin-tiny", False), ("hawk-tiny", False), ("mqa-tiny", True)]:
        model = Griffon(get_preset(preset)).eval()
        with torch.no_grad():
            _, cache = model(torch.randint(0, 256, (1, 40)), return_cache=True)
            size_40 = cache.nbytes()
            _, cache = model(torch.randint(0, 256, (1, 40)), cache=cache)
        assert (cache.nbytes() > size_40) == grows, preset


def test_gradients_match_reference_scan():
    torch.manual_seed(0)
    model = Griffon(get_preset("griffin-tiny").replace(num_layers=2)).double()
    tokens = torch.randint(0, 256, (2, 23))
    seg = torch.stack([doc_positions(23, [9]), doc_positions(23, [])])
    grads = {}
    for backend in ("cpu", "reference"):
        model.zero_grad()
        model.set_scan_backend(backend)
        model(tokens, seg)[0].square().mean().backward()
        grads[backend] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads["cpu"], grads["reference"], strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_bf16_autocast_follows_the_float32_model():
    """Under bf16 autocast the matmuls run in bf16 (the logits differ from float32's) while the
    recurrence and norms stay float32, so logits and gradients stay close to float32's."""
    model = Griffon(get_preset("griffin-tiny"))
    tokens = torch.randint(0, 256, (2, 40))
    seg = torch.stack([doc_positions(40, [17]), doc_positions(40, [])])
    results = {}
    for name, ctx in [
        ("fp32", torch.autocast("cpu", enabled=False)),
        ("bf16", torch.autocast("cpu", dtype=torch.bfloat16)),
    ]:
        model.zero_grad()
        with ctx:
            logits, _ = model(tokens, seg)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
        loss.backward()
        results[name] = (logits.float().detach(), torch.cat([p.grad.flatten() for p in model.parameters()]))
    (l32, g32), (l16, g16) = results["fp32"], results["bf16"]
    assert not torch.equal(l16, l32)
    assert (l16 - l32).norm() / l32.norm() < 0.02
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.99


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: m(torch.tensor([[1, 256]])), "token ids must lie in"),
        (lambda m: m(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)), "segment_pos shape"),
        (lambda m: m(torch.zeros(3, 2, dtype=torch.long), cache=m.init_cache(2)), "cache holds 2 sequences"),
        (lambda m: m(torch.zeros(5, dtype=torch.long)), "(batch, time) integer tensor"),
        (lambda m: m(torch.zeros(1, 5)), "(batch, time) integer tensor"),
    ],
)
def test_bad_inputs_get_clear_errors(call, message):
    model = Griffon(get_preset("griffin-tiny"))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(model)


def test_keep_freed_memory_applies_with_glibc():
    import platform

    from griffon.allocator import keep_freed_memory

    assert keep_freed_memory() == (platform.libc_ver()[0] == "glibc")
