"""distad.compress.get: the spec strings of DESIGN.md, and clear errors for bad ones."""

from __future__ import annotations

import pytest

import distad.compress as C

# Every spec DESIGN.md names, and the forms docs/compression.md documents.
DESIGN_SPECS = [
    "none",
    "fp16",
    "bf16",
    "int8",
    "qsgd:16",
    "terngrad",
    "sign",
    "onebit",
    "topk:0.01",
    "randk:0.01",
    "threshold:1e-3",
    "powersgd:2",
]
MORE_SPECS = [
    "int8:stochastic",
    "efsign",
    "onebit:256",
    "randk:0.01:rescale",
    "topk:0.001+dgc",
    "topk:0.001+dgc:0.95",
    "qsgd:16@allgather",
    "topk:0.01+ef@two_phase",
    "sign@allgather",
    "fp16@allreduce",
    "int8@auto",
]


@pytest.mark.parametrize("spec", DESIGN_SPECS)
@pytest.mark.parametrize("memory", ["", "+ef"])
def test_get_parses_every_design_spec_with_and_without_error_feedback(spec, memory):
    gc = C.get(spec + memory)
    assert isinstance(gc, C.GradientCompression)
    assert gc.compressor.name == spec.split(":")[0]
    assert isinstance(gc.memory, C.ErrorFeedback if memory else C.NoMemory)


@pytest.mark.parametrize("spec", DESIGN_SPECS + MORE_SPECS)
def test_spec_of_the_result_parses_back_to_the_same_spec(spec):
    gc = C.get(spec)
    again = C.get(gc.spec)
    assert (again.spec, again.aggregation) == (gc.spec, gc.aggregation)


def test_get_builds_the_compressor_with_its_arguments():
    assert C.get("qsgd:16").compressor.levels == 16
    assert C.get("topk:0.01").compressor.ratio == 0.01
    assert C.get("threshold:1e-3").compressor.density == 1e-3
    assert C.get("powersgd:2").compressor.rank == 2
    assert C.get("onebit:256").compressor.column == 256
    assert C.get("randk:0.01:rescale").compressor.unbiased
    assert C.get("int8:stochastic").compressor.unbiased
    assert C.get("topk:0.01+dgc:0.95").memory.momentum == 0.95


def test_get_uses_each_compressors_preferred_aggregation_unless_told():
    assert C.get("none").aggregation == "auto"
    assert C.get("fp16").aggregation == "two_phase"
    assert C.get("sign").aggregation == "majority"
    assert C.get("powersgd:2").aggregation == "powersgd"
    assert C.get("topk:0.01+ef@allgather").aggregation == "allgather"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", r"non-empty string"),
        (
            "gzip",
            r"unknown compressor 'gzip' in spec 'gzip'; compressors: none, fp16, .*topk:RATIO",
        ),
        ("topk", r"spec 'topk': takes 1\.\.1 arguments, got 0 \(usage: topk:RATIO"),
        ("topk:lots", r"spec 'topk:lots': 'lots' is not a number"),
        ("topk:2", r"spec 'topk:2': topk: ratio must be in \(0, 1\]"),
        ("qsgd:0", r"qsgd: levels must be an integer in \[1, 127\]"),
        ("qsgd:1.5", r"'1\.5' is not an integer"),
        ("none:3", r"spec 'none:3': takes 0\.\.0 arguments"),
        ("int8:fast", r"unknown option 'fast' \(usage: int8\[:stochastic\]\)"),
        ("randk:0.1:resale", r"unknown option 'resale'"),
        ("onebit:12", r"column length must be a multiple of 8"),
        ("topk:0.01+em", r"unknown memory '\+em' in spec 'topk:0.01\+em'; .*memory: \+ef"),
        ("topk:0.01+ef+ef", r"more than one memory"),
        ("qsgd:16+dgc", r"DGC momentum correction .* not qsgd"),
        ("topk:0.01+dgc:1.5", r"momentum must be in \[0, 1\)"),
        ("topk:0.01@ring", r"unknown aggregation '@ring'.*@allgather"),
        ("qsgd:16@allreduce", r"spec 'qsgd:16@allreduce': .*needs summable payloads"),
        ("topk:0.01@majority", r"'majority' needs sign bits"),
        ("powersgd:2@allgather", r"PowerSGD and only PowerSGD"),
    ],
)
def test_get_rejects_a_bad_spec_with_a_message_naming_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        C.get(spec)


def test_names_lists_every_compressor_in_the_catalogue():
    assert set(C.names()) == {
        "none", "fp16", "bf16", "int8", "qsgd", "terngrad", "sign", "efsign", "onebit",
        "topk", "randk", "threshold", "powersgd",
    }  # fmt: skip
