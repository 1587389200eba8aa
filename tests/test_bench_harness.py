"""bench/compare.py and bench/report.py: the table, the Markdown block it replaces, score comparison.

The comparison itself needs the reference's environment (bench/setup_reference.sh) and minutes;
these check the parts that turn its measurements into bench/RESULTS.md, on made-up numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import compare as C  # noqa: E402
import report as Rp  # noqa: E402


def _args(**kw) -> argparse.Namespace:
    base = dict(grad_checkpointing="none", optimizer_in_backward="false", threads=2, device="cpu", reps=5, reps_eval=3)
    return argparse.Namespace(**{**base, **kw})


RESULTS = [
    {
        "what": "pretrain",
        "preset": "albef-base",
        "res": 224,
        "batch": 4,
        "ours_s": 2.0,
        "theirs_s": 4.0,
        "ours_all": [1.9, 2.0, 2.5],
        "theirs_all": [3.9, 4.0, 4.2],
        "flops_per_step": 100e9,
        "peak_mb_ours": 600.0,
        "peak_mb_theirs": 1000.0,
    },
    {
        "what": "retrieval",
        "preset": "albef-base",
        "res": 224,
        "images": 16,
        "texts": 80,
        "k": 16,
        "ours_s": 1.0,
        "theirs_s": 3.0,
        "pairs": 1536,
        "max_abs_score_diff": 2e-7,
        "top1_agreement": 1.0,
        "ours_dtype": "float32",
    },
    {
        "what": "vqa",
        "preset": "albef-base",
        "res": 224,
        "questions": 8,
        "answers": 200,
        "k": 128,
        "ours_s": 0.5,
        "theirs_s": 1.0,
    },
]


def test_table_reports_ratios_memory_mfu_and_ranges(monkeypatch):
    monkeypatch.setattr(Rp, "versions", lambda: "torch x")
    text = Rp.table(RESULTS, _args(grad_checkpointing="all"), peak_flops=100e9, dtype="float32")
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    pre, ret, vqa = rows["pretrain"], rows["retrieval"], rows["vqa"]
    assert "| 0.50x |" in pre and "(0.60x)" in pre  # time and memory ratios ours / theirs
    assert "MFU 50.0 % / 25.0 %" in pre  # 100 GFLOP in 2 s and 4 s against 100 GFLOP/s
    assert "steps 1.900-2.500 / 3.900-4.200 s" in pre and "gradient checkpointing" in pre
    assert "1536.0 ITM pairs/s | 512.0 ITM pairs/s" in ret and "3.00x pairs/s" in ret
    assert "same top-1 for 100.0 % of queries" in ret
    assert "| 0.50x |" in vqa and "16.00 / 8.00 questions/s" in vqa
    assert "Medians of 5 (training) / 3 (evaluation)" in text
    small_row = {**RESULTS[0], "preset": "albef-small", "reps": 11}
    small = Rp.table([RESULTS[0], small_row], _args(small_reps=11), 100e9, "float32")
    assert "Medians of 5 (training; 11 for the CPU-sized preset) / 3 (evaluation)" in small


def test_memory_probes_report_medians_and_their_spread(monkeypatch):
    monkeypatch.setattr(Rp, "versions", lambda: "torch x")
    probes = [
        {"ours": (610.0, 2.1), "theirs": (1200.0, 4.4)},
        {"ours": (590.0, 2.0), "theirs": (1000.0, 4.0)},
        {"ours": (600.0, 2.3), "theirs": (1100.0, 4.1)},
    ]
    m = C.probe_medians(probes)
    assert (m["peak_mb_ours"], m["peak_mb_theirs"], m["alone_s_ours"], m["alone_s_theirs"]) == (600.0, 1100.0, 2.1, 4.1)
    assert m["peak_mb_theirs_all"] == [1200.0, 1000.0, 1100.0]  # in probe order
    pre = Rp.table([{**RESULTS[0], **m}], _args(), peak_flops=100e9, dtype="float32").splitlines()[-1]
    assert "peak memory 600 / 1100 MB (0.55x, median of 3 probes each: 590-610 / 1000-1200)" in pre
    assert "each side alone in its memory probe: 2.100 / 4.100 s/step" in pre
    one = Rp.table([{**RESULTS[0], **C.probe_medians(probes[:1])}], _args(), 100e9, "float32").splitlines()[-1]
    assert "(0.51x);" in one and "probes" not in one  # a single probe has no spread to show


@pytest.mark.parametrize(
    "ckpt, in_backward, words",
    [
        ("none", "auto", ["AdamW in the backward (the loop's default)"]),
        ("vision", "auto", ["gradient checkpointing of the ViT", "AdamW in the backward (the loop's default)"]),
        ("all", "false", ["gradient checkpointing"]),
        ("none", "false", []),
    ],
)
def test_our_set_up_is_named_in_the_table(ckpt, in_backward, words):
    assert Rp.setup_words(_args(grad_checkpointing=ckpt, optimizer_in_backward=in_backward)) == words


def test_write_block_replaces_only_its_own_block(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# title\n\nprose before\n")
    C.write_block(md, "compare-cpu", "first\n")
    C.write_block(md, "compare-cuda", "gpu\n")
    md.write_text(md.read_text() + "\nprose after\n")
    C.write_block(md, "compare-cpu", "second\n")
    text = md.read_text()
    assert "first" not in text and text.count("second") == 1 and "gpu" in text
    assert text.startswith("# title\n\nprose before\n") and text.endswith("prose after\n")
    assert text.index("second") < text.index("gpu")  # replaced in place, not appended


def test_scored_diff_compares_only_pairs_both_sides_rescored():
    a = torch.tensor([[1.0, -100.0, 3.0], [-100.0, 2.0, 0.5]])
    b = torch.tensor([[1.5, 7.0, -100.0], [-100.0, 2.25, 0.5]])
    assert C.scored_diff(a, b) == pytest.approx(0.5)
    assert torch.isnan(torch.tensor(C.scored_diff(a[:1, 1:2], b[:1, 2:3])))  # nothing in common


class _FakeTrainer(torch.nn.Linear):
    """What bench_pretrain reads of our trainer: parameters and model.set_grad_checkpointing."""

    def __init__(self):
        super().__init__(2, 2)
        self.model = argparse.Namespace(set_grad_checkpointing=lambda setting: None)


def test_main_runs_the_probes_and_rounds_each_preset_asks_for(monkeypatch, tmp_path):
    """main() without the reference: the small preset gets --small-reps rounds, each preset
    --memory-probes probe pairs (3 by default on the CPU), the medians land in the JSON."""
    probes = []

    def fake_probe(side, args):
        probes.append((args.preset, side))
        return (100.0 if side == "ours" else 200.0) + len(probes), 1.0

    monkeypatch.setattr(
        C, "pretrain_sides", lambda *a, **k: (lambda: None, lambda: None, _FakeTrainer(), _FakeTrainer())
    )
    monkeypatch.setattr(C, "peak_rss_of", fake_probe)
    monkeypatch.setattr(C, "matmul_flops_per_s", lambda *a: 1e9)
    monkeypatch.setattr(Rp, "versions", lambda: "torch x")
    out = tmp_path / "r.json"
    assert (
        C.main(
            [
                "--what",
                "pretrain",
                "--reps",
                "2",
                "--small-reps",
                "4",
                "--in-process",
                "--json",
                str(out),
                "--no-bf16-rows",
            ]
        )
        == 0
    )
    base, small = json.loads(out.read_text())["results"]
    assert (len(base["ours_all"]), len(small["ours_all"])) == (2, 4)
    assert probes == [(p, s) for p in ("albef-base", "albef-small") for _ in range(3) for s in ("ours", "theirs")]
    assert base["peak_mb_ours_all"] == [101.0, 103.0, 105.0] and base["peak_mb_ours"] == 103.0
    assert small["peak_mb_theirs"] == 210.0  # probes 8, 10, 12 of the run
    for bad in (["--memory-probes", "0"], ["--small-reps", "0"]):
        with pytest.raises(SystemExit):
            C.main(["--what", "pretrain", *bad])


def test_each_benchmark_runs_in_a_process_of_its_own(monkeypatch, tmp_path):
    """By default every benchmark goes to run_isolated (with the command line it was given and its
    job's name), in order, and the parent only writes the table; one benchmark runs in place."""
    calls = []

    def fake_isolated(argv, job):
        calls.append((tuple(argv), job))
        return {
            **RESULTS[{"pretrain": 0, "pretrain-small": 0, "retrieval": 1, "vqa": 2}[job.removesuffix("@bf16")]],
            "job": job,
            **({"ours_dtype": "bfloat16"} if job.endswith("@bf16") else {}),
        }

    monkeypatch.setattr(C, "run_isolated", fake_isolated)
    monkeypatch.setattr(C, "matmul_flops_per_s", lambda *a: 1e9)
    monkeypatch.setattr(Rp, "versions", lambda: "torch x")
    out = tmp_path / "r.json"
    argv = ["--reps", "2", "--json", str(out)]
    assert C.main(argv) == 0
    assert calls == [
        (tuple(argv), j)
        for j in (
            "pretrain",
            "pretrain-small",
            "pretrain@bf16",
            "pretrain-small@bf16",
            "retrieval",
            "retrieval@bf16",
            "vqa",
            "vqa@bf16",
        )
    ]
    assert [r["job"] for r in json.loads(out.read_text())["results"]] == [j for _, j in calls]
    calls.clear()
    monkeypatch.setattr(C, "run_job", lambda job, *a: {**RESULTS[2], "job": job})
    assert C.main(["--what", "vqa", "--no-bf16-rows", "--json", str(out)]) == 0 and calls == []  # alone: in place


def test_a_child_runs_its_one_job_and_writes_only_its_json(monkeypatch, tmp_path):
    """The child side of run_isolated: the parent's command line (with --write and a --json of
    its own) plus --job and a later --json; it runs that job alone, measures no matmul rate and
    leaves the Markdown file and the user's JSON to the parent."""
    md, user_json, child_json = tmp_path / "RESULTS.md", tmp_path / "user.json", tmp_path / "child.json"
    md.write_text("untouched\n")
    jobs = []
    monkeypatch.setattr(C, "run_job", lambda job, *a: jobs.append(job) or {**RESULTS[1], "job": job})
    monkeypatch.setattr(C, "matmul_flops_per_s", lambda *a: pytest.fail("a child measured the matmul rate"))
    parent = ["--what", "pretrain", "retrieval", "--write", str(md), "--json", str(user_json)]
    assert C.main([*parent, "--job", "retrieval", "--json", str(child_json)]) == 0
    assert jobs == ["retrieval"]
    assert json.loads(child_json.read_text())["results"][0]["job"] == "retrieval"
    assert md.read_text() == "untouched\n" and not user_json.exists()
    seen = []
    monkeypatch.setattr(
        C.subprocess,
        "run",
        lambda cmd, **kw: (
            seen.append(cmd)
            or Path(cmd[-1]).write_text(json.dumps({"results": [{"job": cmd[cmd.index("--job") + 1]}]}))
        ),
    )
    assert C.run_isolated(parent, "vqa") == {"job": "vqa"}
    assert seen[0][2:-4] == parent and seen[0][-4:-1] == ["--job", "vqa", "--json"]


def test_bf16_parts_switches_each_piece_off_and_back(capsys):
    """bench/bf16_parts.py: a row per variant, and every switch it turns off is restored."""
    import bf16_parts

    import albef.models.fast.bert as fast_bert
    import albef.models.fast.recompute as recompute
    import albef.models.fast.vit as fast_vit

    before = (fast_vit.written_out_is_faster, fast_bert.written_out_is_faster, fast_bert.FLOAT32_DECODER_ROWS)
    seen = []
    for piece in ("written-out attention", "float32 MLM decoder", "reused weight cast"):
        with bf16_parts.switched_off(piece):
            q = torch.zeros(1, dtype=torch.bfloat16)
            seen.append(
                (fast_vit.written_out_is_faster(q), fast_bert.FLOAT32_DECODER_ROWS > 0, recompute.REUSE_FORWARD_CAST)
            )
    assert seen == [(False, True, True), (True, False, True), (True, True, False)]
    assert (fast_vit.written_out_is_faster, fast_bert.written_out_is_faster, fast_bert.FLOAT32_DECODER_ROWS) == before
    assert recompute.REUSE_FORWARD_CAST
    assert bf16_parts.main(["--preset", "albef-tiny", "--res", "32", "--batch", "2", "--rounds", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "s/step" not in line]
    assert [r.split(" | ")[0] for r in rows] == [
        "| float32",
        "| bf16",
        "| bf16 without written-out attention",
        "| bf16 without float32 MLM decoder",
        "| bf16 without reused weight cast",
    ]


def test_fusion_probe_names_what_a_negative_is_to_its_positive():
    import fusion_probe as F

    cat_left_heart = (("cat", 1, "left", "heart", 1), {"cat", "heart"})
    assert F._kind(cat_left_heart, cat_left_heart) == F.KINDS[0]  # same meaning: a false negative
    assert F._kind(cat_left_heart, (("heart", 1, "left", "cat", 1), {"cat", "heart"})) == F.KINDS[1]
    assert F._kind(cat_left_heart, (("cat", 2, "left", "heart", 1), {"cat", "heart"})) == F.KINDS[1]
    assert F._kind(cat_left_heart, (("cat", 1, "above", "star", 1), {"cat", "star"})) == F.KINDS[2]
    assert F._kind(cat_left_heart, (("dog", 1, "above", "star", 1), {"dog", "star"})) == F.KINDS[3]
    assert F._kind(cat_left_heart, None) == F.SINGLE


def test_where_probe_scores_linear_knowledge_and_its_absence():
    import where_probe as W

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=gen, dtype=torch.float64)
    groups = torch.arange(400) // 4  # four rows an image, as patches of one image share a fold
    place = torch.stack([x[:, 0] * 2 - x[:, 1], x[:, 2] + 5], 1)  # "where", a linear read of the tokens
    assert W.ridge_r2(x, place, groups, lam=1e-3) == pytest.approx([1.0, 1.0], abs=1e-6)
    unrelated = torch.randn(400, 2, generator=gen, dtype=torch.float64)
    assert max(W.ridge_r2(x, unrelated, groups)) < 0.05  # held out: no better than the mean
    labels = (x[:, 3] - x[:, 4] > 0).long()  # which of two emoji lies under a patch
    assert W.ridge_accuracy(x, labels, groups) > 0.85  # least squares, not a max-margin fit
    assert W.ridge_accuracy(torch.randn(400, 16, generator=gen), labels, groups) < 0.6  # chance 0.5
    assert W.explained_r2(place, place) == [1.0, 1.0]
    assert W.explained_r2(place.mean(0).expand_as(place), place) == pytest.approx([0.0, 0.0], abs=1e-12)


def test_object_masks_weigh_the_named_object_against_the_others():
    import where_probe as W

    a, b, c = [0, 0, 8, 8], [8, 0, 8, 8], [0, 8, 16, 8]  # a 2 x 2 grid of 8-px patches: one, one, two
    named, other = W.object_masks([{"box": a, "candidates": [a, b, c]}, {"box": c, "candidates": [c]}], 2, 8)
    assert named[0].tolist() == [0, 1, 0, 0, 0] and other[0].tolist() == [0, 0, 0.5, 0.5, 0.5]
    assert named[1].tolist() == [0, 0, 0, 1, 1] and other[1].isnan().all()  # no other object: left out
    uniform = torch.full((5,), 0.2, dtype=torch.float64)  # a look spread over [CLS] and the patches
    assert (named[0] @ uniform).item() == pytest.approx(0.2) and (other[0] @ uniform).item() == pytest.approx(0.3)


def test_sibling_negatives_hand_itm_each_rows_unit_partner():
    import scene_variant as SV

    from albef.training.pretrain import ALBEFPretrainer, Negatives

    drawn = torch.tensor([4, 3, 0, 1, 2])  # what ITC's weights gave, 5 rows: the last has no partner
    neg = Negatives(drawn.clone(), drawn.flip(0), torch.ones(5, 5), torch.ones(5, 5))
    everyone = SV.with_sibling_negatives(neg, 1.0, torch.Generator().manual_seed(0))
    assert everyone.image.tolist() == [1, 0, 3, 2, 2] and everyone.text.tolist() == [1, 0, 3, 2, 4]
    assert everyone.weights_i2t is neg.weights_i2t  # the record of the draw is left alone
    nobody = SV.with_sibling_negatives(neg, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(nobody.image, neg.image) and torch.equal(nobody.text, neg.text)
    # a share p replaces about p of the rows, drawn from the step's generator (reproducible)
    n = 4000
    big = Negatives(torch.full((n,), -7), torch.full((n,), -7), None, None)
    a = SV.with_sibling_negatives(big, 0.3, torch.Generator().manual_seed(1))
    b = SV.with_sibling_negatives(big, 0.3, torch.Generator().manual_seed(1))
    assert torch.equal(a.image, b.image) and 0.27 < (a.image != -7).float().mean() < 0.33
    assert not torch.equal(a.image != -7, a.text != -7)  # image and text sides drawn apart
    # the patch lasts as long as the block
    original = ALBEFPretrainer._hard_negatives
    with SV.sibling_negatives(0.5):
        assert ALBEFPretrainer._hard_negatives is not original
    assert ALBEFPretrainer._hard_negatives is original


def test_machine_names_the_cpu_generation_and_its_bf16_flags():
    zen5 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
    zen5 += "model name\t: AMD EPYC\nflags\t\t: fpu avx512f avx512_bf16\n\nprocessor\t: 1\nmodel name\t: other\n"
    assert Rp.machine(zen5).startswith("AMD EPYC (family 26 model 2; avx512_bf16), ")
    skylake = "cpu family\t: 6\nmodel\t\t: 85\nmodel name\t: Intel(R) Xeon(R)\nflags\t\t: avx512f\n"
    assert Rp.machine(skylake).startswith("Intel(R) Xeon(R) (family 6 model 85; no AVX512/AMX bf16), ")
    arm = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd bf16\nCPU implementer\t: 0x41\n"
    assert "(" not in Rp.machine(arm).split(",")[0]  # no x86 family: the name alone
