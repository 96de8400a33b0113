"""`flexsparse show tuned` and `show segments` of a real packed prompt."""

import json

import matplotlib.image as mpimg
import pytest
import torch

from flexsparse import masks
from flexsparse.cli import main
from flexsparse.ensemble import PromptPacker
from flexsparse.models import tiny
from flexsparse.tune.params import spargeattn_example_path

#: SpargeAttn's tuned CogVideoX-2b parameters, shipped in the package (flexsparse/data).
SPARGE = spargeattn_example_path()


def test_show_tuned_spargeattn_file(tmp_path, capsys):
    """The file records thresholds, not sparsity, for its 812 sparse heads: the picture
    draws the thresholds and marks the unknown sparsity, and the output says so."""
    from flexsparse import tune, viz

    params = tune.load_params(SPARGE)
    out = tmp_path / "heads.png"
    assert main(["show", "tuned", str(SPARGE), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "30 layers x 30 heads" in printed
    assert "sparsity: unknown for 812 of 900 heads (not recorded in the file" in printed
    img = mpimg.imread(out)
    fig = viz.plot_tuned(params)
    assert img.shape[:2] == tuple(reversed(fig.canvas.get_width_height()))
    assert [ax.get_xlabel() for ax in fig.axes[:3]] == ["head"] * 3
    assert "sparsity not recorded for 812 heads" in fig.get_suptitle()
    out = tmp_path / "cdf.png"
    assert main(["show", "tuned", str(SPARGE), "--field", "cdfthreshd", "-o", str(out)]) == 0
    assert mpimg.imread(out).shape[0] > 300


def test_show_tuned_needs_a_file(capsys):
    assert main(["show", "tuned"]) == 2
    assert "needs a parameter FILE" in capsys.readouterr().err


def test_show_packed_prompt(tmp_path, capsys):
    tok_dir = tmp_path / "tok"
    tiny.build_tokenizer().save_pretrained(tok_dir)
    spec = {"prefix": "Answer briefly.", "paraphrases": ["What is the capital of France?",
                                                         "Name the French capital."],
            "suffix": "Answer:"}
    (tmp_path / "q.json").write_text(json.dumps(spec))
    out = tmp_path / "packed.png"
    code = main(["show", "segments", "--tokenizer", str(tok_dir), "--prompt-json",
                 str(tmp_path / "q.json"), "-o", str(out)])
    assert code == 0 and out.exists()
    packed = PromptPacker(tiny.build_tokenizer()).pack(spec["paraphrases"], spec["prefix"],
                                                      spec["suffix"])
    n = packed.layout.length
    printed = capsys.readouterr().out
    assert f"tokens    {n} (" in printed
    density = masks.segments(packed.layout).to_dense(n, n).double().mean().item()
    assert f"density   {density:.4f}" in printed
    # the two paraphrases do not see each other
    dense = masks.segments(packed.layout).to_dense(n, n)
    (_, a0, a1), (_, b0, b1) = packed.layout.spans()[1:3]
    assert not dense[b0:b1, a0:a1].any() and dense[b0:b1, :a0].all()
    assert torch.equal(torch.tensor(packed.ids[a0:a1]),
                       torch.tensor(packed.segment_ids[0]))


def test_show_packed_prompt_bad_json(tmp_path, capsys):
    (tmp_path / "q.json").write_text("{not json")
    assert main(["show", "segments", "--tokenizer", str(tmp_path), "--prompt-json",
                 str(tmp_path / "q.json")]) == 2
    assert "not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["show", "causal", "extra.bin"]])
def test_unexpected_file_argument(args, capsys):
    assert main(args) == 2
    assert "unexpected argument" in capsys.readouterr().err
