"""Feature maps of every layout: (B, C, H, W), channels-last (B, H, W, C) and tokens (B, N, C).

The penalties and the three removal-score methods are checked against the naive loops of
tests/reference.py; the channel axis is found by dry forwards at two sizes (or declared).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.testing import assert_close

from deltaft import TransferObjective
from deltaft.attention import channel_removal_scores
from deltaft.layers import detect_layouts, validate_layers
from deltaft.regularizers import DeltaRegularizer, FeatureMapRegularizer
from deltaft.regularizers import functional as RF
from tests.cli_support import (  # noqa: F401 (autouse fixtures)
    one_thread,
    restore_logging,
    run_main,
    write_images,
)
from tests.reference import (
    ref_delta_penalty,
    ref_delta_penalty_channels_last,
    ref_delta_penalty_tokens,
    ref_feature_map_penalty,
    ref_removal_scores,
    ref_removal_scores_last_axis,
)


def _pair(shape: tuple[int, ...], seed: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=gen, dtype=torch.float64)
    t = torch.randn(shape, generator=gen, dtype=torch.float64)
    return {"l": s}, {"l": t}


def _weights(channels: int, seed: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"l": torch.softmax(torch.randn(channels, generator=gen, dtype=torch.float64), 0)}


# --- penalties -------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("uniform", [True, False])
def test_token_penalty_matches_reference(reduction: str, uniform: bool) -> None:
    s, t = _pair((3, 5, 4), seed=0)  # (B, N, C): 1 prefix-like + 4 tokens, 4 channels
    w = None if uniform else _weights(4, seed=1)
    got = RF.delta_penalty(s, t, w, reduction, layouts="BNC")  # type: ignore[arg-type]
    assert_close(got, ref_delta_penalty_tokens(s, t, w, reduction))
    # rank decides when nothing is declared: 3-D maps are tokens
    assert_close(RF.delta_penalty(s, t, w, reduction), got)  # type: ignore[arg-type]
    fm = RF.feature_map_penalty(s, t, reduction, layouts={"l": "BNC"})  # type: ignore[arg-type]
    assert_close(fm, ref_feature_map_penalty(s, t, reduction))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("uniform", [True, False])
def test_channels_last_penalty_matches_reference(reduction: str, uniform: bool) -> None:
    s, t = _pair((2, 3, 4, 5), seed=2)  # (B, H, W, C)
    w = None if uniform else _weights(5, seed=3)
    got = RF.delta_penalty(s, t, w, reduction, layouts="BHWC")  # type: ignore[arg-type]
    assert_close(got, ref_delta_penalty_channels_last(s, t, w, reduction))
    # the same number as the (B, C, H, W) maps with the channel moved to axis 1
    bchw = ({"l": s["l"].permute(0, 3, 1, 2)}, {"l": t["l"].permute(0, 3, 1, 2)})
    assert_close(got, ref_delta_penalty(*bchw, w, reduction))


def test_channels_last_read_as_bchw_is_a_different_number() -> None:
    # why the layout must be declared: undeclared, (B, H, W, C) rows are weighted as channels
    s, t = _pair((2, 3, 4, 5), seed=4)
    w = {"l": torch.tensor([0.7, 0.1, 0.1, 0.05, 0.05], dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"expected \(3,\)"):
        RF.delta_penalty(s, t, w)  # rows (3) read as channels: refused, shape mismatch
    assert_close(
        RF.delta_penalty(s, t, w, layouts="BHWC"), ref_delta_penalty_channels_last(s, t, w)
    )


def test_modules_pass_their_layouts() -> None:
    s, t = _pair((2, 6, 3), seed=5)
    w = _weights(3, seed=6)
    assert_close(
        DeltaRegularizer(["l"], w, layouts={"l": "BNC"})(s, t), ref_delta_penalty_tokens(s, t, w)
    )
    assert_close(FeatureMapRegularizer(layouts="BNC")(s, t), ref_feature_map_penalty(s, t))


def test_layout_errors() -> None:
    s, t = _pair((2, 3, 4, 5), seed=7)
    with pytest.raises(
        ValueError, match=r"'l' is declared BNC but its map has shape \(2, 3, 4, 5\)"
    ):
        RF.delta_penalty(s, t, layouts="BNC")
    with pytest.raises(ValueError, match="layout must be one of BCHW, BHWC, BNC; got 'NHWC'"):
        RF.delta_penalty(s, t, layouts="NHWC")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"No layout for layer 'l'; layouts cover \['m'\]"):
        RF.feature_map_penalty(s, t, layouts={"m": "BCHW"})
    with pytest.raises(
        ValueError, match=r"expected a \(B, C, H, W\), \(B, H, W, C\) or \(B, N, C\)"
    ):
        RF.delta_penalty({"l": torch.zeros(2, 3)}, {"l": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match=r"No layout for layers \['l'\]"):
        DeltaRegularizer(["l"], layouts={"m": "BNC"})
    with pytest.raises(ValueError, match="layout must be one of"):
        FeatureMapRegularizer(layouts="CHW")  # type: ignore[arg-type]


# --- toy models ------------------------------------------------------------------------------
class TokenToy(nn.Module):
    """A tiny ViT: patch embedding, a class and a register token, attention blocks, class head."""

    def __init__(self, dim: int = 6, image: int = 8, fixed: bool = True) -> None:
        super().__init__()
        self.embed_dim = dim
        self.fixed = fixed
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.prefix = nn.Parameter(torch.randn(1, 2, dim))  # class + register token
        self.pos = nn.Parameter(torch.randn(1, 2 + (image // 4) ** 2, dim) * 0.1)
        self.blocks = nn.Sequential(*[_Block(dim) for _ in range(2)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # (B, N, C)
        tokens = torch.cat([self.prefix.expand(x.shape[0], -1, -1), tokens], dim=1)
        if self.fixed:
            tokens = tokens + self.pos  # raises for another image size, as a fixed-size ViT does
        return self.head(self.norm(self.blocks(tokens))[:, 0])  # class token


class _Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU())
        self.out = nn.Linear(2 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]  # tokens interact here
        return x + self.out(self.mlp(x))


class ChannelsLastToy(nn.Module):
    """ConvNeXt/Swin-like: stages whose outputs are (B, H, W, C)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 5, 3, stride=2, padding=1)
        self.stage1 = nn.Sequential(nn.LayerNorm(5), nn.Linear(5, 5), nn.GELU())
        self.down = nn.Conv2d(5, 7, 2, stride=2)
        self.stage2 = nn.Sequential(nn.LayerNorm(7), nn.Linear(7, 7), nn.GELU())
        self.head = nn.Linear(7, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        x = x + self.stage1(x)
        x = self.down(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, H/2, W/2, C')
        x = x + self.stage2(x)
        return self.head(x.mean(dim=(1, 2)))


def _batches(n: int, size: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(4, 3, size, size, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (4,), generator=gen),
        )
        for _ in range(n)
    ]


def _settled(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    return model.double().eval()


# --- layout detection -----------------------------------------------------------------------
def test_detect_layouts_from_two_sizes_and_declarations() -> None:
    torch.manual_seed(0)
    assert detect_layouts(ChannelsLastToy(), ["stage1", "stage2", "stem"], input_size=16) == {
        "stage1": "BHWC",
        "stage2": "BHWC",
        "stem": "BCHW",
    }
    # a model that takes any size: the tokens scale, the channels stay
    assert detect_layouts(TokenToy(fixed=False), ["blocks.1"], input_size=8) == {"blocks.1": "BNC"}
    # a fixed-size model: its width (embed_dim) declares the tokens' channel axis
    assert detect_layouts(TokenToy(), ["blocks.0", "blocks.1"], input_size=8) == {
        "blocks.0": "BNC",
        "blocks.1": "BNC",
    }


def test_undecidable_layouts_are_refused_with_how_to_declare() -> None:
    model = ChannelsLastToy()
    with pytest.raises(
        ValueError, match=r"Cannot tell which axis of layer '1'.*\(1, 3, 1, 1\) at 16x16"
    ):
        detect_layouts(nn.Sequential(model, nn.Unflatten(1, (3, 1, 1))), ["1"], input_size=16)
    fixed = TokenToy()
    fixed.embed_dim = 99  # declares nothing that fits
    with pytest.raises(
        ValueError, match=r"does not take another input size.*layouts=\{'blocks.0': 'BHWC'\}"
    ):
        detect_layouts(fixed, ["blocks.0"], input_size=8)
    with pytest.raises(ValueError, match=r"'head' of ChannelsLastToy gave shape \(1, 3\)"):
        detect_layouts(model, ["head"], input_size=16)
    with pytest.raises(ValueError, match=r"Some that qualify: .*stage2"):
        validate_layers(model, ["head"], input_size=16)
    assert validate_layers(model, ["stage2"], input_size=16) == {"stage2": (1, 4, 4, 7)}


# --- removal scores -------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["exact", "reference"])
def test_token_scores_match_reference(method: str) -> None:
    model = _settled(TokenToy())
    batches = _batches(2, 8, seed=10)
    layers = ["blocks.0", "blocks.1", "blocks.0.mlp"]
    # a fixed-size model whose MLP width (12) is not its embed_dim: declared, not detected
    got = channel_removal_scores(
        model,
        batches,
        layers,
        n_batches=2,
        method=method,  # type: ignore[arg-type]
        chunk_size=4,
        layouts="BNC",
    )
    want = ref_removal_scores_last_axis(model, batches, layers)
    for name in layers:
        assert got[name].shape == ((12,) if name == "blocks.0.mlp" else (6,))
        assert_close(got[name], want[name], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["exact", "reference"])
def test_channels_last_scores_match_reference(method: str) -> None:
    model = _settled(ChannelsLastToy())
    batches = _batches(2, 16, seed=11)
    layers = ["stage1", "stage2", "stem"]
    got = channel_removal_scores(
        model,
        batches,
        layers,
        n_batches=2,
        method=method,
        chunk_size=3,  # type: ignore[arg-type]
    )
    last = ref_removal_scores_last_axis(model, batches, ["stage1", "stage2"])
    first = ref_removal_scores(model, batches, ["stem"])
    assert got["stage1"].shape == (5,) and got["stage2"].shape == (7,)
    for name, want in {**last, **first}.items():
        assert_close(got[name], want, rtol=1e-9, atol=1e-12)


def _taylor_naive(model: nn.Module, x: Tensor, y: Tensor, name: str) -> Tensor:
    """-sum over samples and positions of a * dL/da, channels on the last axis."""
    captured: list[Tensor] = []

    def hook(module: nn.Module, args: object, out: Tensor) -> Tensor:
        out = out.detach().requires_grad_(True)
        captured.append(out)
        return out

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        loss = nn.functional.cross_entropy(model(x), y)
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(loss, captured)
    a = captured[0].detach()
    channels = a.shape[-1]
    flat_a, flat_g = a.reshape(-1, channels), grad.reshape(-1, channels)
    return torch.stack([-(flat_a[:, j] * flat_g[:, j]).sum() for j in range(channels)])


@pytest.mark.parametrize("toy,name,size", [("token", "blocks.0", 8), ("last", "stage2", 16)])
def test_taylor_sums_over_positions_not_channels(toy: str, name: str, size: int) -> None:
    model = _settled(TokenToy() if toy == "token" else ChannelsLastToy())
    batches = _batches(1, size, seed=12)
    got = channel_removal_scores(model, batches, [name], n_batches=1, method="taylor")[name]
    assert_close(got, _taylor_naive(model, *batches[0], name))


def test_declared_layouts_are_checked_against_the_outputs() -> None:
    model = _settled(ChannelsLastToy())
    batches = _batches(1, 16, seed=13)
    got = channel_removal_scores(
        model, batches, ["stage2"], n_batches=1, method="reference", layouts={"stage2": "BHWC"}
    )
    assert got["stage2"].shape == (7,)
    with pytest.raises(ValueError, match=r"'stage2' is declared BNC but its map has shape"):
        channel_removal_scores(model, batches, ["stage2"], n_batches=1, layouts="BNC")


# --- the objective ---------------------------------------------------------------------------
def test_objective_reads_channels_last_and_token_maps_on_the_channel_axis() -> None:
    torch.manual_seed(0)
    source = ChannelsLastToy().double()
    model = ChannelsLastToy().double()
    model.load_state_dict(source.state_dict())
    with torch.no_grad():
        model.stage2[1].weight.add_(0.3)
    w = {"stage2": torch.softmax(torch.arange(7, dtype=torch.float64), 0)}
    objective = TransferObjective(
        model, source, "delta", ["stage2"], w, alpha=1.0, head="head", input_size=16
    )
    assert objective.layouts == {"stage2": "BHWC"}
    x, y = _batches(1, 16, seed=14)[0]
    out = objective(x, y)
    maps: dict[str, list[Tensor]] = {"s": [], "t": []}
    for key, net in (("s", source), ("t", model)):
        handle = net.stage2.register_forward_hook(lambda m, a, o, k=key: maps[k].append(o))
        net.eval()(x)
        handle.remove()
    want = ref_delta_penalty_channels_last({"stage2": maps["s"][0]}, {"stage2": maps["t"][0]}, w)
    assert_close(out["reg/delta"], want)

    token = TransferObjective(TokenToy(), TokenToy(), "fm", ["blocks.1"], head="head", input_size=8)
    assert token.layouts == {"blocks.1": "BNC"}
    declared = TransferObjective(
        TokenToy(), TokenToy(), "fm", ["blocks.1"], head="head", layouts={"blocks.1": "BNC"}
    )
    assert declared.layouts == {"blocks.1": "BNC"}
    with pytest.raises(ValueError, match=r"No layout for layers \['blocks.1'\]"):
        TransferObjective(TokenToy(), TokenToy(), "fm", ["blocks.1"], head="head", layouts={})


@pytest.mark.slow
def test_swin_stage_outputs_are_read_with_their_channels() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    source = torchvision.models.swin_t(num_classes=10)
    model = torchvision.models.swin_t(num_classes=3)
    model.features.load_state_dict(source.features.state_dict())
    stages = ["features.1", "features.3", "features.5", "features.7"]
    assert detect_layouts(model, stages, input_size=64) == dict.fromkeys(stages, "BHWC")
    batches = [(torch.randn(2, 3, 64, 64), torch.tensor([0, 2]))]
    scores = channel_removal_scores(model, batches, stages, n_batches=1, method="taylor")
    assert [s.shape[0] for s in scores.values()] == [96, 192, 384, 768]  # not 16 + 8 + 4 + 2 rows
    weights = {name: torch.softmax(s, 0) for name, s in scores.items()}
    objective = TransferObjective(
        model, source, "delta", stages, weights, head="head", input_size=64
    )
    assert objective.layouts == dict.fromkeys(stages, "BHWC")
    out = objective(*batches[0])
    assert torch.isfinite(out["reg/delta"])


@pytest.mark.slow
def test_default_layers_of_transformers_are_residual_streams_with_known_layouts() -> None:
    torchvision = pytest.importorskip("torchvision")
    timm = pytest.importorskip("timm")
    from deltaft.layers import default_layers

    stream = ["encoder.layers.encoder_layer_" + i for i in ("2", "5", "8", "11")]
    stages = ["features.1", "features.3", "features.5", "features.7"]
    cases = [
        (torchvision.models.vit_b_16(), stream, "BNC"),
        (torchvision.models.swin_t(), stages, "BHWC"),
        (torchvision.models.swin_v2_t(), stages, "BHWC"),
        (
            timm.create_model("vit_tiny_patch16_224"),
            ["blocks.2", "blocks.5", "blocks.8", "blocks.11"],
            "BNC",
        ),
        (
            timm.create_model("deit_tiny_patch16_224"),
            ["blocks.2", "blocks.5", "blocks.8", "blocks.11"],
            "BNC",
        ),
        (
            timm.create_model("swin_tiny_patch4_window7_224"),
            ["layers.0", "layers.1", "layers.2", "layers.3"],
            "BHWC",
        ),
    ]
    for model, want, layout in cases:
        assert default_layers(model) == want, type(model).__name__
        assert detect_layouts(model, want) == dict.fromkeys(want, layout)


# --- layouts decided once and declared (library and command line) ----------------------------
def channels_last_toy(num_classes: int = 3) -> nn.Module:
    """Factory for the command line: ``tests.test_layouts:channels_last_toy``."""
    model = ChannelsLastToy()
    model.head = nn.Linear(7, num_classes)
    return model


def test_a_declared_layout_is_checked_against_two_input_sizes() -> None:
    from deltaft.layers import check_layers

    model = ChannelsLastToy()
    assert check_layers(model, ["stage1", "stage2"], input_size=16) == {
        "stage1": "BHWC",
        "stage2": "BHWC",
    }
    # declared where the shapes agree: accepted, and a declaration wins on a pooled map
    assert check_layers(model, ["stage2"], input_size=16, layouts="BHWC") == {"stage2": "BHWC"}
    # BCHW on a (B, H, W, C) map: axis 1 is the rows (4 at 16 px, 8 at 32 px), not 7 channels
    with pytest.raises(
        ValueError,
        match=r"'stage2' is declared BCHW, but axis 1 of its map changes with the input size "
        r"\(\(1, 4, 4, 7\), then \(1, 8, 8, 7\).*its map is BHWC; declare BHWC.*--layout",
    ):
        check_layers(model, ["stage2"], input_size=16, layouts="BCHW")
    with pytest.raises(ValueError, match=r"'stem' is declared BHWC, but axis 3"):
        detect_layouts(model, ["stem"], input_size=16, layouts={"stem": "BHWC"})
    # a fixed-size model cannot show it: the declaration is taken
    assert detect_layouts(TokenToy(), ["blocks.0.mlp"], input_size=8, layouts="BNC") == {
        "blocks.0.mlp": "BNC"
    }
    # declared without a check, a layout whose channel count is not the attention's is refused
    w = {"stage2": torch.full((7,), 1 / 7)}
    objective = TransferObjective(
        ChannelsLastToy(), ChannelsLastToy(), "delta", ["stage2"], w, head="head",
        layouts={"stage2": "BCHW"},
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"'stage2' has shape \(7,\), expected \(8,\)"):
        objective(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))


def _attention_args(data: Path, layers: str) -> list[str]:
    """``deltaft attention`` on the channels-last toy, one short pass."""
    return [
        "--data", str(data), "--model", "tests.test_layouts:channels_last_toy",
        "--weights", "none", "--image-size", "24", "--batch-size", "8", "--workers", "0",
        "--device", "cpu", "--attention-epochs", "1", "--attention-batches", "1",
        "--layers", layers,
    ]  # fmt: skip


def test_the_attention_command_weights_the_channels_of_a_channels_last_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file

    write_images(tmp_path / "data", "train", 4, seed=0)
    common = _attention_args(tmp_path / "data", "stage1,stage2")
    path = tmp_path / "att.safetensors"
    code, out, err = run_main(capsys, "attention", *common, "--out", str(path))
    assert code == 0, err
    weights = {k: v for k, v in load_file(path).items() if k.startswith("weights")}
    # 5 and 7 channels: not 12 and 6 image rows, as a (B, C, H, W) reading would give
    assert sorted(v.shape[0] for v in weights.values()) == [5, 7], weights.keys()
    assert "stage1: 5 channels" in out and "stage2: 7 channels" in out
    code, _, err = run_main(
        capsys, "attention", *common, "--layout", "BCHW", "--out", str(tmp_path / "b")
    )
    assert code == 2 and "declared BCHW, but axis 1" in err and "--layout" in err
    assert err.strip().splitlines()[-1].startswith("deltaft: error: Layer 'stage1' is declared")
    assert "Traceback" not in err and err.count("error") == 1, err


def test_layouts_declared_by_layer_leave_the_others_detected() -> None:
    from deltaft.layers import check_layers

    model = ChannelsLastToy()
    layers = ["stem", "stage1", "stage2"]
    assert check_layers(model, layers, input_size=16, layouts={"stage2": "BHWC"}) == {
        "stem": "BCHW",  # detected
        "stage1": "BHWC",  # detected
        "stage2": "BHWC",  # declared
    }
    with pytest.raises(ValueError, match=r"'stem' is declared BHWC, but axis 3"):
        check_layers(model, layers, input_size=16, layouts={"stem": "BHWC"})


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("auto", None),
        (" BNC ", "BNC"),
        ("stage2=BHWC", {"stage2": "BHWC"}),
        ("blocks.3 = BNC, stem=BCHW", {"blocks.3": "BNC", "stem": "BCHW"}),
    ],
)
def test_the_layout_setting_reads_one_layout_or_pairs(text: str, want: object) -> None:
    from deltaft.app.checks import layout_setting

    assert layout_setting(text) == want


@pytest.mark.parametrize("text", ["", "bnc", "stem=XYZ", "=BNC", "stem=", "a=BNC,a=BCHW", "a=BNC,"])
def test_a_bad_layout_setting_shows_the_accepted_forms(text: str) -> None:
    from deltaft.app.config import TrainConfig
    from deltaft.app.errors import SettingError

    with pytest.raises(SettingError, match=r"layout must be auto, one of BCHW, BHWC, BNC for"):
        TrainConfig(data="d", model="m", out="o", layout=text)


def test_the_attention_command_takes_layouts_by_layer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_images(tmp_path / "data", "train", 4, seed=0)
    common = _attention_args(tmp_path / "data", "stem,stage2")
    code, out, err = run_main(
        capsys, "attention", *common, "--layout", "stage2=BHWC", "--out", str(tmp_path / "a")
    )
    assert code == 0, err
    assert "stem: 5 channels" in out and "stage2: 7 channels" in out
    for layout, message in [
        ("stage2=BCHW", "Layer 'stage2' is declared BCHW, but axis 1"),
        ("stage1=BHWC", "--layout names stage1, not among the regularized layers stem, stage2"),
    ]:
        code, _, err = run_main(
            capsys, "attention", *common, "--layout", layout, "--out", str(tmp_path / "b")
        )
        assert code == 2 and err.count("error") == 1, err
        assert err.strip().splitlines()[-1].startswith(f"deltaft: error: {message}"), err
