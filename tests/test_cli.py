"""The ``flexsparse`` command: flag parsing, spec files, ``show`` and ``demo``.

Most tests call ``cli.main`` in-process (fast); three run ``python -m flexsparse`` in a
subprocess to check the real entry point: exit codes, one-line errors, no traceback.
"""

import json
import os
import subprocess
import sys

import matplotlib.image as mpimg
import pytest
import torch

import flexsparse as fs
from flexsparse import cli, masks
from flexsparse.cli import UsageError
from flexsparse.commands import _common as C
from flexsparse.commands import demo


def run_cli(*argv, timeout=180, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "flexsparse", *map(str, argv)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


# -- flag values ---------------------------------------------------------------------------
def test_parse_flag_values():
    assert C.parse_video("49x480x720") == (49, 480, 720)
    assert C.parse_ints("--boundaries", "0,5,9") == [0, 5, 9]
    assert C.parse_adjacency("110,111,011") == [[1, 1, 0], [1, 1, 1], [0, 1, 1]]
    assert C.parse_adjacency([[1, 0], [0, 1]]) == [[1, 0], [0, 1]]
    assert C.parse_adjacency("1,1,0;1,1,1;0,1,1") == [[1, 1, 0], [1, 1, 1], [0, 1, 1]]
    assert C.parse_segments("12:20,18,22:6") == fs.SegmentLayout(12, [20, 18, 22], 6)
    assert C.parse_segments("20,18") == fs.SegmentLayout(0, [20, 18], 0)
    assert C.parse_segments("4:20,18") == fs.SegmentLayout(4, [20, 18], 0)
    assert C.parse_segments({"prefix": 3, "segments": [5, 6]}) == fs.SegmentLayout(3, [5, 6])


@pytest.mark.parametrize("fn, value, message", [
    (C.parse_video, "49x480", "--video must be FRAMESxHEIGHTxWIDTH"),
    (C.parse_video, "49xAx720", "like 49x480x720, got '49xAx720'"),
    (C.parse_adjacency, "110,11", "--adjacency: adjacency must be a square matrix"),
    (C.parse_adjacency, "120,111,011", "--adjacency: adjacency entries must be 0 or 1"),
    (C.parse_segments, "12:20,x:6", "--segments must be an integer, got 'x'"),
    (C.parse_segments, "1:2:3:4", "PREFIX:LEN,LEN"),
    (C.parse_segments, "12:20,0:6", "--segments must be >= 1, got 0"),
])
def test_parse_errors_name_the_flag(fn, value, message):
    with pytest.raises(UsageError, match=message):
        fn(value)


# -- spec files ----------------------------------------------------------------------------
def test_spec_json_and_yaml_build_the_same_pattern(tmp_path):
    spec = {"pattern": "scenes", "layout": {"frames": 6, "tokens_per_frame": 32,
                                            "text_tokens": 16},
            "boundaries": [0, 2, 4], "adjacency": [[1, 1, 0], [1, 1, 1], [0, 1, 1]]}
    (tmp_path / "s.json").write_text(json.dumps(spec))
    (tmp_path / "s.yaml").write_text(
        "pattern: scenes\nlayout: {frames: 6, tokens_per_frame: 32, text_tokens: 16}\n"
        "boundaries: [0, 2, 4]\nadjacency: '110,111,011'\n"
    )
    built = []
    for name in ("s.json", "s.yaml"):
        args = cli.build_parser().parse_args(["show", "--spec", str(tmp_path / name)])
        built.append(C.build(C.resolve_options(args, args.pattern)))
    layout = fs.VideoLayout(frames=6, tokens_per_frame=32, text_tokens=16)
    want = masks.scenes(layout, [0, 2, 4], [[1, 1, 0], [1, 1, 1], [0, 1, 1]]).to_dense()
    for b in built:
        assert b.layout == layout and b.scenes == [0, 2, 4]
        assert torch.equal(b.mask.to_dense(), want)
    # Flags override the spec.
    args = cli.build_parser().parse_args(
        ["show", "--spec", str(tmp_path / "s.json"), "--boundaries", "0,3"])
    opts = C.resolve_options(args, None)
    assert opts["boundaries"] == "0,3"


@pytest.mark.parametrize("content, name, message", [
    ("{not json", "bad.json", "is not valid JSON"),
    ("pattern: [unclosed", "bad.yaml", "is not valid YAML"),
    ('{"pattern": "causal", "colour": 3}', "bad2.json", "unknown key 'colour'"),
    ("[1, 2]", "list.json", "must hold a mapping"),
    ("pattern: causal", "spec.txt", "must be a .json, .yaml or .yml file"),
])
def test_bad_spec_files(tmp_path, content, name, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(UsageError, match=message):
        C.load_spec(tmp_path / name)


def test_missing_spec_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="--spec file not found"):
        C.load_spec(tmp_path / "nope.json")


# -- building patterns ---------------------------------------------------------------------
def build(*argv):
    args = cli.build_parser().parse_args(["show", *argv])
    return C.build(C.resolve_options(args, args.pattern))


def test_build_patterns_match_the_library():
    b = build("radial", "--frames", "4", "--tokens-per-frame", "64", "--text", "16",
              "--decay", "0.5", "--block-size", "32")
    layout = fs.VideoLayout(frames=4, tokens_per_frame=64, text_tokens=16)
    want = masks.radial(layout, 0.5, "cogvideox", block_size=32)
    assert b.layout == layout and b.mask.name == want.name
    assert torch.equal(b.mask.to_dense(), want.to_dense())
    b = build("radial", "--video", "49x480x720")  # CogVideoX preset: text 226 at the start
    assert b.layout == fs.VideoLayout(13, 1350, 226) and b.kv_len == 17_776
    b = build("segments", "--segments", "12:20,18,22:6", "--generated", "4")
    assert b.kv_len == 82 and b.layout == fs.SegmentLayout(12, [20, 18, 22], 6)
    assert torch.equal(b.mask.to_dense(82),
                       masks.segments(fs.SegmentLayout(12, [20, 18, 22], 6)).to_dense(82))
    b = build("window", "--length", "300", "--window", "40", "--q-len", "10")
    assert (b.q_len, b.kv_len) == (10, 300)
    assert torch.equal(b.mask.to_dense(10, 300),
                       (masks.causal() & masks.sliding_window(40)).to_dense(10, 300))
    b = build("window", "--length", "300", "--window", "40", "--bidirectional")
    assert torch.equal(b.mask.to_dense(300), masks.sliding_window(40).to_dense(300))
    b = build("causal", "--segments", "4:8,8:2")  # a layout only annotates causal
    assert b.kv_len == 22 and isinstance(b.layout, fs.SegmentLayout)


@pytest.mark.parametrize("argv, message", [
    (["scenes", "--frames", "6", "--tokens-per-frame", "8"], "scenes needs --boundaries"),
    (["scenes", "--boundaries", "0,5", "--adjacency", "110,111,011"],
     "--adjacency is 3 x 3 but --boundaries names 2 scenes"),
    (["scenes", "--boundaries", "0,5,20"], "past the last latent frame"),
    (["radial", "--frames", "13"], "--tokens-per-frame is needed"),
    (["radial", "--video", "49x480x720", "--frames", "13"], "either --video or --frames"),
    (["radial", "--video", "49x480x721"], "width must be a multiple of 16"),
    (["radial", "--decay", "fast"], "--decay must be a number"),
    (["segments"], "segments needs --segments"),
    (["window", "--length", "100", "--q-len", "200"], "--q-len must be <= the sequence"),
    (["blob"], "pattern must be one of radial, scenes, segments, causal, window; got 'blob'"),
])
def test_build_errors(argv, message):
    with pytest.raises((UsageError, ValueError), match=message):
        build(*argv)


# -- show in-process -----------------------------------------------------------------------
def test_show_prints_stats_and_writes_picture(tmp_path, capsys):
    out = tmp_path / "w.png"
    rc = cli.main(["show", "window", "--length", "1024", "--window", "128", "-o", str(out),
                   "--dpi", "80"])
    assert rc == 0
    text = capsys.readouterr().out
    stats = (masks.causal() & masks.sliding_window(128)).stats(1024, 1024)
    assert f"density  {stats['density']:.4f}" in text
    assert (f"{stats['total']:,} total, {stats['empty']:,} empty "
            f"({stats['tiles_skipped']:.1%} skipped), {stats['partial']:,} partial") in text
    assert mpimg.imread(out).shape[:2] == (512, 480)  # 6 x 6.4 in at 80 dpi
    assert "wrote    " in text


def test_show_without_output_only_prints(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["show", "causal", "--length", "256"]) == 0
    assert "density  0.5020" in capsys.readouterr().out  # 256*257/2 / 256^2
    assert list(tmp_path.iterdir()) == []


def test_show_bad_values_exit_2_with_one_line(capsys, tmp_path):
    assert cli.main(["show", "radial", "--video", "49x480"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["flexsparse show: error: --video must be FRAMESxHEIGHTxWIDTH like 49x480x720,"
                   " got '49x480'"]
    assert cli.main(["show", "causal", "--length", "64", "-o", str(tmp_path / "m.jpg")]) == 2
    assert "-o must end in .png, .svg or .pdf" in capsys.readouterr().err
    assert cli.main(["show", "--spec", str(tmp_path / "missing.yaml")]) == 2
    assert "--spec file not found" in capsys.readouterr().err


# -- demo pieces ---------------------------------------------------------------------------
def test_markdown_table_and_sections():
    table = demo.markdown_table(["a", "bb"], [["1", "2"], ["333", "4"]])
    assert table.splitlines() == ["| a   | bb |", "|-----|----|", "| 1   | 2  |",
                                  "| 333 | 4  |"]
    before = list(demo.SECTIONS)
    try:
        demo.register_section("extra", "no_such_module:section")
        assert demo.SECTIONS[-1] == ("extra", "no_such_module:section")
        fn, why = demo._load("no_such_module:section")
        assert fn is None and "no_such_module" in why
        with pytest.raises(ValueError, match="module:function"):
            demo.register_section("x", "nocolon")
        seen = []
        demo.register_section("inline", lambda ctx: seen.append(ctx) or demo.SectionResult("t"))
        fn, why = demo._load(demo.SECTIONS[-1][1])
        assert why == "" and fn("ctx").title == "t" and seen == ["ctx"]
    finally:
        demo.SECTIONS[:] = before


# -- the real entry point ------------------------------------------------------------------
def test_subprocess_show_good_and_bad(tmp_path):
    out = tmp_path / "radial.png"
    res = run_cli("show", "radial", "--frames", "13", "--tokens-per-frame", "1350",
                  "--text", "226", "--decay", "1.0", "--model", "cogvideox", "-o", out)
    assert res.returncode == 0, res.stderr
    assert "17,776 tokens" in res.stdout and "density  0.5" in res.stdout
    assert mpimg.imread(out).shape[:2] == (640, 600)
    res = run_cli("show", "scenes", "--boundaries", "0,5,9", "--adjacency", "110,11")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "flexsparse show: error: --adjacency: adjacency must be a square matrix")
    assert "Traceback" not in res.stderr


def test_subprocess_argparse_errors_are_one_line():
    res = run_cli("show", "radial", "--model", "sora")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--model: invalid choice: 'sora'" in lines[0]


def test_subprocess_demo_quick_writes_report(tmp_path):
    res = run_cli("demo", "--quick", "-o", tmp_path / "demo", timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    report = (tmp_path / "demo" / "report.md").read_text()
    for name in ("radial", "scenes", "segments", "causal_window", "document"):
        assert f"![{name}]({name}.png)" in report
        assert (tmp_path / "demo" / f"{name}.png").stat().st_size > 5000
    rows = [line for line in report.splitlines() if line.startswith("| radial")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[1] == "17,776"
    # flex and sdpa ran and agree with the float64 reference (float32 inputs).
    for cell in cells[5:7]:
        err = float(cell.split("(")[1].rstrip(")"))
        assert err < 1e-5, cells
    assert "| pattern" in res.stdout


def test_demo_bad_arguments_and_help(tmp_path, capsys):
    assert cli.main(["demo", "--sections", "nope", "-o", str(tmp_path / "d")]) == 2
    assert "--sections: unknown ['nope']; available: patterns" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert cli.main(["demo", "-o", str(tmp_path / "file")]) == 2
    assert "-o must be a directory" in capsys.readouterr().err
    for cmd in ("show", "demo"):
        with pytest.raises(SystemExit) as exc:
            cli.main([cmd, "--help"])
        assert exc.value.code == 0
        assert f"usage: flexsparse {cmd}" in capsys.readouterr().out


# -- the CLI promise: one line, never a traceback -------------------------------------------
def one_line_error(capsys, argv, code=2):
    """Run ``argv`` in-process; the exit code and the single stderr line."""
    assert cli.main([str(a) for a in argv]) == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("argv, message", [
    (["show", "radial", "--decay", "inf"], "--decay must be a finite number, got 'inf'"),
    (["show", "radial", "--decay", "-1"], "--decay must be > 0, got -1"),
    (["show", "window", "--window", str(10**23)],
     "--window must be <= 1,048,576 tokens (the limit of this command), got 100,000,000,"),
    (["show", "causal", "--length", str(10**11)], "--length must be <= 1,048,576 tokens"),
    (["show", "radial", "--frames", "1000000", "--tokens-per-frame", "1000000"],
     "is over the limit of 1,048,576 tokens"),
    (["show", "segments", "--segments", "0:600000,600000:0"], "the limit is 1,048,576"),
    (["show", "causal", "--length", "100000", "--tile", "1"],
     "--tile 1 gives 10,000,000,000 tiles for 100,000 x 100,000 tokens; the limit is"),
    (["show", "radial", "--video", "49x7x720"], "--video: height must be a multiple of 16"),
])
def test_show_refuses_bad_values_before_allocating(capsys, argv, message):
    assert message in one_line_error(capsys, argv)


def test_spec_files_nested_or_huge(tmp_path, capsys):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    assert "is nested too deeply to be a spec" in one_line_error(
        capsys, ["show", "--spec", deep])
    big = tmp_path / "big.json"
    big.write_text(" " * (C.MAX_SPEC_BYTES + 1) + "{}")
    assert f"is {C.MAX_SPEC_BYTES + 3:,} bytes; the limit is" in one_line_error(
        capsys, ["show", "--spec", big])
    (tmp_path / "d.json").mkdir()
    assert "is a directory" in one_line_error(capsys, ["show", "--spec", tmp_path / "d.json"])


def test_tokenizer_path_that_is_not_a_directory_never_reaches_the_hub(tmp_path, capsys,
                                                                      monkeypatch):
    import transformers

    def no_hub(*args, **kwargs):
        raise AssertionError("AutoTokenizer.from_pretrained must not be called")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_hub)
    (tmp_path / "q.json").write_text(json.dumps({"paraphrases": ["a b"]}))
    for tok in (tmp_path / "q.json", "gpt2"):  # a file; a hub name
        line = one_line_error(capsys, ["show", "segments", "--tokenizer", tok,
                                       "--prompt-json", tmp_path / "q.json"])
        assert "--tokenizer must be a local tokenizer directory" in line


def test_outputs_and_devices_are_checked_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    inp = tmp_path / "q.jsonl"
    inp.write_text(json.dumps({"id": 1, "paraphrases": ["x"]}) + "\n")
    model = tmp_path / "model"  # empty: loading it would fail with another message
    model.mkdir()
    ens = ["ensemble", "--model", model, "--input", inp]
    assert f"--output {str(tmp_path)!r} is a directory" in one_line_error(
        capsys, [*ens, "--output", tmp_path])
    assert "--device cuda: CUDA is not available" in one_line_error(
        capsys, [*ens, "--output", tmp_path / "a.jsonl", "--device", "cuda"])
    assert "--stop must be a non-empty string" in one_line_error(
        capsys, [*ens, "--output", tmp_path / "a.jsonl", "--stop", ""])
    data = tmp_path / "d.txt"
    data.write_text("hello\n")
    tune = ["tune", "--model", model, "--data", data]
    (tmp_path / "x.safetensors").mkdir()
    assert f"--out {str(tmp_path / 'x.safetensors')!r} is a directory" in one_line_error(
        capsys, [*tune, "--out", tmp_path / "x.safetensors"])
    assert "--out must end in .safetensors" in one_line_error(
        capsys, [*tune, "--out", tmp_path / "p.pt"])
    assert "--device cuda: CUDA is not available" in one_line_error(
        capsys, [*tune, "--out", tmp_path / "p.safetensors", "--device", "cuda"])
    assert "--l1 must be a finite number" in one_line_error(
        capsys, [*tune, "--out", tmp_path / "p.safetensors", "--l1", "nan"])
    assert "--model must be a saved model directory" in one_line_error(
        capsys, ["tune", "--model", data, "--data", data, "--out", tmp_path / "p.safetensors"])
    assert "--device cuda: CUDA is not available" in one_line_error(
        capsys, ["demo", "--device", "cuda", "-o", tmp_path / "demo"])


def test_programming_errors_keep_their_traceback(monkeypatch, tmp_path):
    """Only argument checks become one-line exits: a ValueError from the work itself (a
    bug) propagates."""
    from flexsparse import viz

    def broken(*args, **kwargs):
        raise ValueError("a bug inside plot_mask")

    monkeypatch.setattr(viz, "plot_mask", broken)
    with pytest.raises(ValueError, match="a bug inside plot_mask"):
        cli.main(["show", "causal", "--length", "64", "-o", str(tmp_path / "m.png")])
    with pytest.raises(TypeError, match="bad"):
        with cli.user_input("--x"):
            pass
        raise TypeError("bad")  # outside the block: untouched
    with pytest.raises(UsageError, match="^--x: n must be >= 1, got 0$"):
        with cli.user_input("--x"):
            raise ValueError("n must be >= 1, got 0")


def test_token_level_falls_back_to_tiles_above_the_limit(tmp_path, capsys, monkeypatch):
    from flexsparse import viz
    from flexsparse.commands import show
    from flexsparse.mask import Mask

    assert show.TOKEN_LEVEL_MAX == viz.TOKEN_LEVEL_MAX
    with pytest.raises(ValueError, match="level='token' draws at most 16,777,216 pairs"):
        viz.render(masks.causal(), 4097, 4097, level="token")

    def no_dense(*args, **kwargs):
        raise AssertionError("the dense mask must not be built")

    monkeypatch.setattr(Mask, "to_dense", no_dense)
    out = tmp_path / "big.png"
    assert cli.main(["show", "causal", "--length", "5000", "--level", "token", "-o",
                     str(out)]) == 0
    text = capsys.readouterr().out
    assert ("level    block (token level draws at most 16,777,216 pairs = 4096 x 4096; "
            "this is 5,000 x 5,000)") in text
    assert mpimg.imread(out).shape[:2] == (640, 600)
    with pytest.raises(SystemExit):
        cli.main(["show", "--help"])
    assert "up to 4096 x 4096 pairs" in " ".join(capsys.readouterr().out.split())
