"""``parse_adjacency``: the one adjacency parser of the library and the command line."""

import json

import networkx as nx
import numpy as np
import pytest
import torch

import flexsparse as fs
from flexsparse import masks
from flexsparse.masks.scenes import parse_adjacency

CHAIN = [[1, 1, 0], [1, 1, 1], [0, 1, 1]]


def _looped_path():
    g = nx.path_graph(3)
    g.add_edges_from((i, i) for i in range(3))
    return g


def _forms(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(CHAIN))
    (tmp_path / "s.json").write_text(json.dumps("110,111,011"))
    np.save(tmp_path / "a.npy", np.array(CHAIN, dtype=np.int8))
    (tmp_path / "a.txt").write_text("1 1 0\n1,1,1\n\n0 1 1\n")
    (tmp_path / "d.txt").write_text("110\n111\n011\n")
    return [
        CHAIN, tuple(map(tuple, CHAIN)), np.array(CHAIN), np.array(CHAIN, dtype=bool),
        np.array(CHAIN, dtype=np.float32), torch.tensor(CHAIN), torch.tensor(CHAIN).bool(),
        torch.tensor(CHAIN, dtype=torch.bfloat16), _looped_path(),
        "110,111,011", " 110, 111 ,011 ", "1,1,0;1,1,1;0,1,1", "1 1 0; 1 1 1; 0 1 1",
        "110;111;011", tmp_path / "a.json", str(tmp_path / "a.json"), tmp_path / "s.json",
        str(tmp_path / "a.npy"), tmp_path / "a.txt", str(tmp_path / "d.txt"),
    ]


def test_every_form_gives_the_same_matrix(tmp_path):
    want = torch.tensor(CHAIN, dtype=torch.bool)
    for form in _forms(tmp_path):
        got = parse_adjacency(form)
        assert got.dtype == torch.bool and got.device.type == "cpu", form
        assert torch.equal(got, want), form
        assert torch.equal(parse_adjacency(form, num_scenes=3), want), form


def test_graphs_directed_and_undirected():
    assert parse_adjacency(nx.DiGraph([(0, 1), (2, 1)])).tolist() == [
        [False, True, False], [False, False, False], [False, True, False]]
    g = nx.Graph()
    g.add_nodes_from(range(4))
    g.add_edge(3, 0)
    got = parse_adjacency(g, 4)
    assert got[0, 3] and got[3, 0] and got.sum() == 2
    # the diagonal is not forced by the parser: scenes forces it
    assert not parse_adjacency("00,00").any()


def test_scenes_uses_the_parser():
    layout = fs.VideoLayout(6, 2, text_tokens=1)
    ref = masks.scenes(layout, [0, 2, 4], CHAIN).to_dense()
    for form in ("110,111,011", "1,1,0;1,1,1;0,1,1", nx.path_graph(3)):
        assert torch.equal(masks.scenes(layout, [0, 2, 4], form).to_dense(), ref)


@pytest.mark.parametrize("bad, message", [
    ("110,11", "square"),
    ("1,1;1", "square"),
    ("120,111,011", r"entries must be 0 or 1 \(found \[2.0\]\)"),
    ([[float("nan"), 1], [1, 1]], r"entries must be 0 or 1 \(found \[nan\]\)"),
    ([[0.5, 1], [1, 1]], "entries must be 0 or 1"),
    (np.array([[1j, 0], [0, 1]]), "complex"),
    (torch.tensor([[1j, 0], [0, 1]]), "complex"),
    ("abc", "row 'abc' is not a row of 0/1"),
    ("", "is empty"),
    ("no_such_file.json", "file 'no_such_file.json' does not exist"),
    ([[1, 0], [0, 1, 1]], "square"),
    ([1, 0, 1], "square"),
    (np.zeros((0, 0)), "non-empty"),
    (np.array([["a", "b"], ["c", "d"]]), "entries must be 0/1 or booleans"),
    (nx.path_graph(["a", "b"]), r"nodes must be scene ids 0\.\.1"),
])
def test_bad_adjacency_raises_value_error_naming_it(bad, message):
    with pytest.raises(ValueError, match=message) as err:
        parse_adjacency(bad)
    assert str(err.value).startswith("adjacency")


def test_wrong_size_and_wrong_kind():
    with pytest.raises(ValueError, match=r"adjacency must be 3 x 3 .* got shape \(2, 2\)"):
        parse_adjacency("11,11", 3)
    with pytest.raises(ValueError, match=r"nodes must be scene ids 0\.\.2"):
        parse_adjacency(nx.path_graph(4), 3)
    with pytest.raises(ValueError, match="num_scenes must be >= 1"):
        parse_adjacency(CHAIN, 0)
    for bad in (None, {"a": 1}, 3):
        with pytest.raises(TypeError, match="adjacency must be one of"):
            parse_adjacency(bad)


def test_nan_and_complex_rejected_by_scenes():
    layout = fs.VideoLayout(4, 2)
    with pytest.raises(ValueError, match="adjacency entries"):
        masks.scenes(layout, [0, 2], [[1, float("nan")], [0, 1]])
    with pytest.raises(ValueError, match="adjacency entries"):
        masks.scenes(layout, [0, 2], np.array([[1, 1j], [0, 1]]))
