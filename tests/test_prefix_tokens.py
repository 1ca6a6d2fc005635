"""Prefix tokens (class, distillation, register) of (B, N, C) maps: kept by default, left out of
the penalties and the removal scores on request; checked against naive loops on the maps with the
first P tokens dropped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.testing import assert_close

from deltaft import TransferObjective
from deltaft.attention import channel_removal_scores
from deltaft.layouts import declared_prefix_tokens
from deltaft.regularizers import DeltaRegularizer, FeatureMapRegularizer
from deltaft.regularizers import functional as RF
from tests.cli_support import (  # noqa: F401 (autouse fixtures)
    one_thread,
    restore_logging,
    run_main,
    write_images,
)
from tests.reference import ref_delta_penalty, ref_delta_penalty_tokens, ref_feature_map_penalty
from tests.test_layouts import TokenToy, _batches, _settled


def _maps(shape: tuple[int, ...], seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(shape, generator=gen, dtype=torch.float64),
        torch.randn(shape, generator=gen, dtype=torch.float64),
    )


def token_toy(num_classes: int = 3) -> nn.Module:
    """Factory for the command line: a class and a register token, declared."""
    model = TokenToy(dim=6, image=8)
    model.head = nn.Linear(6, num_classes)
    model.num_prefix_tokens = 2  # type: ignore[assignment]
    return model


def undeclared_token_toy(num_classes: int = 3) -> nn.Module:
    model = TokenToy(dim=6, image=8)
    model.head = nn.Linear(6, num_classes)
    return model


# --- penalties ---------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_penalties_leave_the_prefix_tokens_out(reduction: str) -> None:
    s_tok, t_tok = _maps((3, 7, 4), seed=0)  # (B, N, C): 2 prefix + 5 patch tokens
    s_img, t_img = _maps((3, 4, 2, 2), seed=1)  # (B, C, H, W): no tokens to leave out
    s, t = {"tok": s_tok, "img": s_img}, {"tok": t_tok, "img": t_img}
    w = {"tok": torch.softmax(torch.arange(4.0, dtype=torch.float64), 0), "img": None}
    weights = {"tok": w["tok"], "img": torch.full((4,), 0.25, dtype=torch.float64)}
    layouts = {"tok": "BNC", "img": "BCHW"}
    got = RF.delta_penalty(s, t, weights, reduction, layouts, prefix_tokens=2)  # type: ignore[arg-type]
    want = ref_delta_penalty_tokens(
        {"tok": s_tok[:, 2:]}, {"tok": t_tok[:, 2:]}, {"tok": w["tok"]}, reduction
    ) + ref_delta_penalty({"img": s_img}, {"img": t_img}, None, reduction)
    assert_close(got, want)
    # a mapping by name gives the same; 0 (default) keeps every token
    by_name = RF.delta_penalty(s, t, weights, reduction, layouts, {"tok": 2})  # type: ignore[arg-type]
    assert_close(by_name, want)
    kept = RF.delta_penalty(s, t, weights, reduction, layouts)  # type: ignore[arg-type]
    assert_close(
        kept,
        ref_delta_penalty_tokens({"tok": s_tok}, {"tok": t_tok}, {"tok": w["tok"]}, reduction)
        + ref_delta_penalty({"img": s_img}, {"img": t_img}, None, reduction),
    )
    fm = RF.feature_map_penalty(s, t, reduction, layouts, prefix_tokens=2)  # type: ignore[arg-type]
    want_fm = ref_feature_map_penalty(
        {"tok": s_tok[:, 2:], "img": s_img}, {"tok": t_tok[:, 2:], "img": t_img}, reduction
    )
    assert_close(fm, want_fm)
    # the modules pass it on
    module = DeltaRegularizer(["tok", "img"], weights, reduction, layouts, prefix_tokens=2)  # type: ignore[arg-type]
    assert_close(module(s, t), want)
    assert_close(FeatureMapRegularizer(reduction, layouts, 2)(s, t), want_fm)  # type: ignore[arg-type]


def test_prefix_token_errors() -> None:
    s, t = _maps((2, 3, 4), seed=2)
    with pytest.raises(ValueError, match=r"'l' has 3 tokens; leaving out 3 prefix tokens"):
        RF.delta_penalty({"l": s}, {"l": t}, prefix_tokens=3)
    with pytest.raises(ValueError, match=r"prefix_tokens must be integers >= 0; got -1"):
        RF.feature_map_penalty({"l": s}, {"l": t}, prefix_tokens=-1)
    with pytest.raises(ValueError, match=r"names layer 'c', whose map is BCHW"):
        RF.delta_penalty({"c": s[..., None]}, {"c": t[..., None]}, prefix_tokens={"c": 1})
    with pytest.raises(ValueError, match=r"prefix_tokens names \['blocks.1'\], which are not"):
        RF.delta_penalty({"l": s}, {"l": t}, prefix_tokens={"l": 1, "blocks.1": 1})
    with pytest.raises(ValueError, match=r"prefix_tokens names \['x'\], which are not"):
        model = _settled(TokenToy())
        channel_removal_scores(model, _batches(1, 8, seed=0), ["blocks.0"], prefix_tokens={"x": 1})
    with pytest.raises(ValueError, match=r"prefix_tokens must be integers >= 0, got True"):
        DeltaRegularizer(["l"], prefix_tokens=True)


# --- removal scores ------------------------------------------------------------------------------
def _ref_scores_after_prefix(
    model: nn.Module, batches: list[tuple[Tensor, Tensor]], name: str, prefix: int
) -> Tensor:
    """delta[j] = mean_b CE(output[:, n, j] = 0 for every token n >= prefix) - CE, with loops."""
    module = dict(model.named_modules())[name]
    per_batch = []
    with torch.no_grad():
        for x, y in batches:
            base = nn.functional.cross_entropy(model(x), y)
            channels = module(torch.zeros(1, 1, 6, dtype=x.dtype)).shape[-1]
            deltas = []
            for j in range(channels):

                def zero(m: nn.Module, a: object, out: Tensor, j: int = j) -> Tensor:
                    out = out.clone()
                    for n in range(prefix, out.shape[1]):
                        out[:, n, j] = 0
                    return out

                handle = module.register_forward_hook(zero)
                try:
                    deltas.append(nn.functional.cross_entropy(model(x), y) - base)
                finally:
                    handle.remove()
            per_batch.append(torch.stack(deltas))
    return torch.stack(per_batch).mean(dim=0)


def _taylor_after_prefix(model: nn.Module, x: Tensor, y: Tensor, name: str, prefix: int) -> Tensor:
    """-sum over samples b and tokens n >= prefix of a[b, n, j] * dL/da[b, n, j], with loops."""
    module = dict(model.named_modules())[name]
    seen: list[Tensor] = []

    def keep(m: nn.Module, a: object, out: Tensor) -> None:
        out.retain_grad()
        seen.append(out)

    handle = module.register_forward_hook(keep)
    try:
        nn.functional.cross_entropy(model(x), y).backward()
    finally:
        handle.remove()
    a, g = seen[0].detach(), seen[0].grad
    assert g is not None
    return torch.stack(
        [
            -sum(
                a[b, n, j] * g[b, n, j]
                for b in range(a.shape[0])
                for n in range(prefix, a.shape[1])
            )
            for j in range(a.shape[2])
        ]
    )


@pytest.mark.parametrize("method", ["exact", "reference"])
def test_scores_with_prefix_tokens_left_out_match_the_reference(method: str) -> None:
    model = _settled(TokenToy())  # 2 prefix tokens (class, register) + 4 patch tokens, float64
    batches = _batches(2, 8, seed=20)
    layers = ["blocks.0", "blocks.1"]
    got = channel_removal_scores(
        model,
        batches,
        layers,
        n_batches=2,
        method=method,
        chunk_size=4,
        prefix_tokens=2,  # type: ignore[arg-type]
    )
    included = channel_removal_scores(model, batches, layers, n_batches=2, method=method)  # type: ignore[arg-type]
    for name in layers:
        want = _ref_scores_after_prefix(model, batches, name, prefix=2)
        assert_close(got[name], want, rtol=1e-9, atol=1e-12)
        assert not torch.allclose(got[name], included[name])  # the prefix tokens did count
    # blocks.1 feeds the head through the class token only: without it, nothing is left to score
    assert_close(got["blocks.1"], torch.zeros(6, dtype=torch.float64), atol=1e-12, rtol=0)


def test_taylor_scores_sum_over_the_tokens_after_the_prefix() -> None:
    model = _settled(TokenToy())
    x, y = _batches(1, 8, seed=21)[0]
    got = channel_removal_scores(
        model, [(x, y)], ["blocks.0"], n_batches=1, method="taylor", prefix_tokens={"blocks.0": 1}
    )["blocks.0"]
    assert_close(got, _taylor_after_prefix(model, x, y, "blocks.0", prefix=1))


def test_objective_leaves_prefix_tokens_out() -> None:
    torch.manual_seed(0)
    source, model = TokenToy().double(), TokenToy().double()
    x, y = _batches(1, 8, seed=22)[0]
    objective = TransferObjective(
        model, source, "fm", ["blocks.1"], head="head", layouts="BNC", prefix_tokens=2
    )
    maps: dict[str, Tensor] = {}
    for key, net in (("s", source), ("t", model)):
        handle = net.blocks[1].register_forward_hook(lambda m, a, o, k=key: maps.update({k: o}))
        net.eval()(x)
        handle.remove()
    want = ref_feature_map_penalty({"l": maps["s"][:, 2:]}, {"l": maps["t"][:, 2:]})
    assert_close(objective.eval()(x, y)["reg/fm"], 0.01 * want)


def test_models_declare_their_prefix_tokens() -> None:
    torchvision = pytest.importorskip("torchvision")
    assert declared_prefix_tokens(token_toy()) == 2
    assert declared_prefix_tokens(undeclared_token_toy()) is None
    assert declared_prefix_tokens(torchvision.models.resnet18()) is None
    vit = torchvision.models.VisionTransformer(32, 16, 1, 2, 8, 16, num_classes=3)
    assert declared_prefix_tokens(vit) == 1
    timm = pytest.importorskip("timm")
    assert declared_prefix_tokens(timm.create_model("test_vit", pretrained=False)) == 1


# --- the command line ----------------------------------------------------------------------------
def test_exclude_prefix_tokens_through_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file

    write_images(tmp_path / "data", "train", 4, seed=0)
    common = [
        "--data", str(tmp_path / "data"), "--weights", "none", "--image-size", "8",
        "--batch-size", "8", "--workers", "0", "--device", "cpu", "--attention-epochs", "1",
        "--attention-batches", "1", "--layers", "blocks.0,blocks.1",
    ]  # fmt: skip
    files = {}
    for label, extra in (("kept", []), ("left out", ["--exclude-prefix-tokens"])):
        path = tmp_path / f"{len(files)}.safetensors"
        model = ["--model", "tests.test_prefix_tokens:token_toy"]
        code, _, err = run_main(capsys, "attention", *common, *model, *extra, "--out", str(path))
        assert code == 0, err
        files[label] = load_file(path)
    # the class token carries everything blocks.1 passes on: left out, its scores are all 0
    assert torch.count_nonzero(files["left out"]["scores/blocks.1"]) == 0
    assert torch.count_nonzero(files["kept"]["scores/blocks.1"]) > 0
    # the file records what was scored; a run that penalizes other tokens refuses it
    from deltaft.attention import ChannelAttention

    assert ChannelAttention.load(tmp_path / "1.safetensors").prefix_tokens == 2
    assert ChannelAttention.load(tmp_path / "0.safetensors").prefix_tokens == 0
    code, _, err = run_main(
        capsys, "train", *common, "--model", "tests.test_prefix_tokens:token_toy",
        "--attention", str(tmp_path / "0.safetensors"), "--exclude-prefix-tokens",
        "--epochs", "1", "--out", str(tmp_path / "run"),
    )  # fmt: skip
    assert code == 2 and "Traceback" not in err, err
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith(
            "deltaft: error: The attention was scored with prefix tokens none left out, but the "
            "penalty leaves out {'blocks.0': 2, 'blocks.1': 2}"
        )
    ), err
    code, _, err = run_main(
        capsys, "attention", *common, "--model", "tests.test_prefix_tokens:undeclared_token_toy",
        "--exclude-prefix-tokens", "--out", str(tmp_path / "x.safetensors"),
    )  # fmt: skip
    assert code == 2 and "Traceback" not in err
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith("deltaft: error: --exclude-prefix-tokens: TokenToy declares no prefix tokens")
    ), err
