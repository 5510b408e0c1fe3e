"""`tggbc convert`: an official checkpoint (names from original_tables) to safetensors, and its refusals."""

import pytest
import torch

from test_models_detectors import Payload, original_state_dict, save
from tggbc.cli import main
from tggbc.convert import convert_file
from tggbc.models.checkpoint import load_converted
from tggbc.models.detectors import build_detector

pytest.importorskip("safetensors", reason="tggbc convert writes safetensors")

NAME = "petrv1_r50_flash_704_24e"


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "petrv1.pth"
    return save(path, original_state_dict(NAME, seed=3))


@pytest.mark.slow  # three 150 MB conversions
def test_convert_command_writes_loadable_weights(official, tmp_path, capsys):
    out = tmp_path / "petr.safetensors"
    assert main(["convert", str(official), "--model", NAME, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tensors mapped onto petrv1_r50_flash_704_24e" in printed and "code_weights" in printed
    model = build_detector(NAME)
    load_converted(model, out)
    sd = torch.load(official, weights_only=True)["state_dict"]
    assert torch.equal(model.state_dict()["pts_bbox_head.decoder.layers.2.cross_attn.in_proj_bias"],
                       sd["pts_bbox_head.transformer.decoder.layers.2.attentions.1.attn.in_proj_bias"])  # fmt: skip
    # The output is never replaced without --force, and stays intact when refused.
    before = out.read_bytes()
    assert main(["convert", str(official), "--model", NAME, "--out", str(out)]) == 2
    assert "exists: pass --force" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["convert", str(official), "--model", "petr-r50-704x256", "--out", str(out), "--force"]) == 0


def test_convert_refusals_name_the_problem(official, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    assert main(["convert", str(official), "--model", "stream_petr_r50_flash_704_bs2_seq_24e", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "reference_points.weight' has shape (900, 3)" in err and not out.exists()
    assert main(["convert", str(official), "--model", "nope", "--out", str(out)]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(["convert", str(official), "--model", NAME, "--out", str(tmp_path / "x.pth")]) == 2
    assert "must be a .safetensors file" in capsys.readouterr().err
    evil = tmp_path / "evil.pth"
    torch.save({"meta": Payload(), "state_dict": {}}, evil)
    assert main(["convert", str(evil), "--model", NAME, "--out", str(out)]) == 2
    assert "never unpickles code" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit) as exit_:  # argparse's own check of the path
        main(["convert", str(tmp_path / "absent.pth"), "--model", NAME, "--out", str(out)])
    assert exit_.value.code == 2 and "no such file" in capsys.readouterr().err


def test_partial_checkpoints_need_allow_partial(tmp_path):
    sd = original_state_dict(NAME, seed=4)
    del sd["img_neck.fpn_convs.0.conv.bias"]
    sd["pts_bbox_head.extra_thing.weight"] = torch.zeros(3)
    path = save(tmp_path / "partial.pth", sd, wrap=False)
    out = tmp_path / "p.safetensors"
    with pytest.raises(ValueError, match="first misfit is checkpoint tensor 'pts_bbox_head.extra_thing.weight'"):
        convert_file(path, NAME, out)
    assert not out.exists()
    converted = convert_file(path, NAME, out, allow_partial=True)
    assert converted.missing == ["img_neck.fpn_convs.0.conv.bias"]
    assert converted.unused == ["pts_bbox_head.extra_thing.weight"]
    model = build_detector(NAME)
    with pytest.raises(ValueError, match="does not fit"):
        load_converted(model, out)
    load_converted(model, out, strict=False)
