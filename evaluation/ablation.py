"""The ablation report: the verdict per question of docs/ablation.md, each a sentence computed
from the summary.json of the ablation runs (launch.study configs/ablation), with the perplexity
tables (mean and spread over seeds). `python -m launch.ablation` (launch/ablation.py) writes it.
"""

from __future__ import annotations

from evaluation.study import ppl_table

# The ablation's runs (configs/ablation/, tests/evaluation/test_ablation.py checks): scheme ->
# seeds (run.seed 0 .. n-1; run names `scheme`, `scheme_seed1`, ...), in the order the tables
# list them.
PLAN = {
    "alibi": 3,
    "rope_alibi": 1,
    "vorope_alibi": 1,
    "hybrid": 3,
    "hybrid_scaled": 3,
    "accrot_alibi": 1,
    "accrot_alibi_scaled": 1,
    "rope": 1,
    "accrot": 1,
    "accrot_scaled": 1,
    "path_alibi": 3,
    "fox": 1,
    "hybrid_fox": 3,
    "path_fox": 1,
}
NOISE_SCHEMES = tuple(s for s, n in PLAN.items() if n == 3)

# Q1: from, to, what the step changes.
STEPS = [
    ("alibi", "rope_alibi", "RoPE on q, k"),
    ("rope_alibi", "vorope_alibi", "values rotated too"),
    ("vorope_alibi", "hybrid", "learned free increments instead of RoPE's"),
    ("rope_alibi", "accrot_alibi", "learned q, k increments (side step)"),
    ("hybrid", "hybrid_scaled", "scaled increments"),
]
# Q3: the forget gate against the bias it replaces.
GATES = [("fox", "alibi"), ("hybrid_fox", "hybrid_scaled"), ("path_fox", "path_alibi")]
HYBRIDS = ("hybrid", "hybrid_scaled", "hybrid_fox")
REFERENCES = ("alibi", "path_alibi")


def run_names(scheme: str, seeds: int) -> list[str]:
    """The run names of a scheme's seeds, as configs/ablation names them."""
    return [scheme, *(f"{scheme}_seed{k}" for k in range(1, seeds))]


def lengths_of(schemes: dict) -> list[str]:
    """Every evaluation length in the summary, shortest first."""
    return sorted({n for entry in schemes.values() for n in entry["ppl"]}, key=int)


def trained_length(schemes: dict) -> str | None:
    """The trained length: the longest evaluation length without positions beyond it."""
    within = [n for e in schemes.values() for n in e["ppl"] if n not in e["ppl_beyond"]]
    return max(within, key=int) if within else None


def missing(schemes: dict, needed: list[str] | tuple[str, ...]) -> list[str]:
    """The runs of `needed` (and their perplexities at the summary's lengths) not in the
    summary: run names, or `scheme at N` for a length a scheme was not evaluated at."""
    lengths = lengths_of(schemes)
    gaps = []
    for scheme in dict.fromkeys(needed):
        entry = schemes.get(scheme)
        ran = set(entry["runs"]) if entry else set()
        gaps += [run for run in run_names(scheme, PLAN.get(scheme, 1)) if run not in ran]
        if entry:
            gaps += [f"{scheme} at {n}" for n in lengths if n not in entry["ppl"]]
    return gaps


def not_measured(gaps: list[str]) -> str:
    return f"not measured yet (missing: {', '.join(gaps)})"


def mean(schemes: dict, scheme: str, n: str) -> float:
    return schemes[scheme]["ppl"][n]["mean"]


def spread(schemes: dict, scheme: str, n: str) -> float:
    return schemes[scheme]["ppl"][n]["spread"]


def noise(schemes: dict, n: str) -> float:
    """The largest seed spread among the three-seed schemes at length n."""
    return max(spread(schemes, s, n) for s in NOISE_SCHEMES)


def seed_spread(schemes: dict, scheme: str, n: str) -> float:
    """A scheme's spread over its seeds at length n; for a scheme trained with one seed, which
    has no spread of its own, the noise."""
    return spread(schemes, scheme, n) if PLAN.get(scheme, 1) > 1 else noise(schemes, n)


def _listing(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _span(name: str, values: dict) -> str:
    """`differences -1.00 to +0.50`, or `difference -1.00` where they all round alike."""
    low, high = f"{min(values.values()):+.2f}", f"{max(values.values()):+.2f}"
    return f"{name} {low} to {high}" if low != high else f"{name.removesuffix('s')} {low}"


# Q1 ---------------------------------------------------------------------------------------


def _step(row: dict, n: str) -> str:
    return f"{row['what']} ({row['from']} -> {row['to']}, {row['change'][n]:+.2f})"


def factor_steps(schemes: dict) -> dict:
    """Q1: each step's perplexity change at the trained and the longest length, the noise
    there, and the verdict."""
    gaps = missing(schemes, [*[s for step in STEPS for s in step[:2]], *NOISE_SCHEMES])
    if gaps:
        return {"verdict": not_measured(gaps)}
    ends = [trained_length(schemes), lengths_of(schemes)[-1]]
    rows = [
        {
            "from": a,
            "to": b,
            "what": what,
            "change": {n: mean(schemes, b, n) - mean(schemes, a, n) for n in ends},
        }
        for a, b, what in STEPS
    ]
    sentences = []
    for n in ends:
        deficit = mean(schemes, "hybrid", n) - mean(schemes, "alibi", n)
        eps = noise(schemes, n)
        costs = [_step(r, n) for r in rows if r["change"][n] > eps]
        gains = [_step(r, n) for r in rows if r["change"][n] < -eps]
        head = (
            f"At {n} the hybrid is {deficit:+.2f} from alibi "
            f"({mean(schemes, 'hybrid', n):.2f} vs {mean(schemes, 'alibi', n):.2f}; "
            f"noise {eps:.2f})"
        )
        if costs or gains:
            sentences.append(
                f"{head}: the steps that cost more than the noise are {_listing(costs) or 'none'}; "
                f"the steps that gain more than it are {_listing(gains) or 'none'}."
            )
        else:
            sentences.append(f"{head}: no step changes perplexity by more than the noise.")
    return {
        "lengths": ends,
        "noise": {n: noise(schemes, n) for n in ends},
        "rows": rows,
        "verdict": " ".join(sentences),
    }


def _factor_section(result: dict) -> list[str]:
    lines = []
    if "rows" in result:
        ends = result["lengths"]
        header = ["step", "from -> to", *[f"change at {n}" for n in ends]]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in result["rows"]:
            cells = [f"{r['change'][n]:+.2f}" for n in ends]
            lines.append(f"| {r['what']} | {r['from']} -> {r['to']} | " + " | ".join(cells) + " |")
        lines.append("| noise | | " + " | ".join(f"{result['noise'][n]:.2f}" for n in ends) + " |")
        lines.append("")
    return lines


# Q2 ---------------------------------------------------------------------------------------


def scaled_gap(schemes: dict) -> dict:
    """Q2: accrot's and accrot_scaled's gaps to rope at the trained length against the noise."""
    gaps = missing(schemes, ["rope", "accrot", "accrot_scaled", *NOISE_SCHEMES])
    if gaps:
        return {"verdict": not_measured(gaps)}
    n = trained_length(schemes)
    rope = mean(schemes, "rope", n)
    old = mean(schemes, "accrot", n) - rope
    new = mean(schemes, "accrot_scaled", n) - rope
    eps = noise(schemes, n)
    numbers = (
        f"at {n}, accrot_scaled - rope = {new:+.2f} against accrot - rope = {old:+.2f} "
        f"(rope {rope:.2f}; noise {eps:.2f})"
    )
    if new < -eps:
        outcome, verdict = "reversed", f"Closed and reversed: accrot_scaled beats rope, {numbers}."
    elif abs(new) <= eps:
        outcome, verdict = (
            "closed",
            f"Closed: accrot_scaled is within the noise of rope, {numbers}.",
        )
    elif new < old - eps:
        outcome = "narrowed"
        verdict = f"Narrowed, not closed: the gap shrank by {old - new:.2f}, {numbers}."
    else:
        outcome, verdict = "not closed", f"Not closed: {numbers}."
    if abs(old) <= eps:
        verdict += " accrot itself was within the noise of rope: there was no gap to close."
    return {
        "length": n,
        "old": old,
        "new": new,
        "noise": eps,
        "outcome": outcome,
        "verdict": verdict,
    }


# Q3 ---------------------------------------------------------------------------------------


def gate_comparison(schemes: dict, challenger: str, reference: str) -> dict:
    """Q3, one pair: the challenger beats the reference if it is better by more than the two
    seed spreads together at every length (the noise for a one-seed scheme), loses if worse by
    more at every length."""
    needs_noise = any(PLAN.get(s, 1) == 1 for s in (challenger, reference))
    gaps = missing(schemes, [challenger, reference, *(NOISE_SCHEMES if needs_noise else ())])
    label = f"{challenger} vs {reference}"
    if gaps:
        return {
            "challenger": challenger,
            "reference": reference,
            "verdict": f"{label}: " + not_measured(gaps),
        }
    lengths = lengths_of(schemes)
    diff = {n: mean(schemes, challenger, n) - mean(schemes, reference, n) for n in lengths}
    margin = {
        n: seed_spread(schemes, challenger, n) + seed_spread(schemes, reference, n) for n in lengths
    }
    better = [n for n in lengths if diff[n] < -margin[n]]
    worse = [n for n in lengths if diff[n] > margin[n]]
    span = _span("differences", diff)
    if len(better) == len(lengths):
        outcome = "beats"
        verdict = (
            f"{challenger} beats {reference}: better by more than the combined spreads at "
            f"every length ({span})."
        )
    elif len(worse) == len(lengths):
        outcome = "loses"
        verdict = (
            f"{challenger} loses to {reference}: worse by more than the combined spreads at "
            f"every length ({span})."
        )
    else:
        outcome = "no separable difference"
        parts = []
        if better:
            parts.append(f"better at {', '.join(better)}")
        if worse:
            parts.append(f"worse at {', '.join(worse)}")
        parts.append(
            "within the combined spreads at " + ("the other lengths" if parts else "every length")
        )
        verdict = f"{label}: no separable difference ({'; '.join(parts)}; {span})."
    return {
        "challenger": challenger,
        "reference": reference,
        "diff": diff,
        "margin": margin,
        "outcome": outcome,
        "verdict": verdict,
    }


# Q4 ---------------------------------------------------------------------------------------


def hybrid_beats_references(schemes: dict, variant: str) -> dict:
    """Q4, one variant: at each length, mean + spread below the lowest mean - spread of alibi
    and path_alibi."""
    gaps = missing(schemes, [variant, *REFERENCES])
    if gaps:
        return {"variant": variant, "verdict": f"{variant}: " + not_measured(gaps)}
    lengths = lengths_of(schemes)
    margin = {
        n: min(mean(schemes, r, n) - spread(schemes, r, n) for r in REFERENCES)
        - (mean(schemes, variant, n) + spread(schemes, variant, n))
        for n in lengths
    }
    fails = [n for n in lengths if margin[n] <= 0]
    span = _span("margins", margin)
    if not fails:
        verdict = f"{variant}: yes, beyond the seed spreads at every length ({span})."
    elif len(fails) == len(lengths):
        verdict = f"{variant}: no, it fails at every length ({', '.join(fails)}; {span})."
    else:
        verdict = f"{variant}: no, it fails at {', '.join(fails)} ({span})."
    return {
        "variant": variant,
        "margin": margin,
        "fails": fails,
        "beats": not fails,
        "verdict": verdict,
    }


def _margin_table(columns: list[tuple[str, dict]]) -> list[str]:
    """One row per length, one column per measured comparison."""
    columns = [(name, values) for name, values in columns if values is not None]
    if not columns:
        return []
    lengths = sorted({n for _, values in columns for n in values}, key=int)
    lines = ["| length | " + " | ".join(name for name, _ in columns) + " |"]
    lines.append("|" + "---|" * (len(columns) + 1))
    for n in lengths:
        lines.append(f"| {n} | " + " | ".join(values[n] for _, values in columns) + " |")
    return [*lines, ""]


# The report ---------------------------------------------------------------------------------


def _ordered(schemes: dict) -> dict:
    """The summary's schemes in the plan's order (any others after)."""
    order = [s for s in PLAN if s in schemes] + [s for s in schemes if s not in PLAN]
    return {s: schemes[s] for s in order}


def _how_it_was_run(schemes: dict, machine: dict, lengths: list[str]) -> list[str]:
    planned = [run for scheme, seeds in PLAN.items() for run in run_names(scheme, seeds)]
    ran = {run for entry in schemes.values() for run in entry["runs"]}
    absent = [run for run in planned if run not in ran]
    seconds = list(machine.get("seconds_per_run", {}).values())
    many = [s for s, n in PLAN.items() if n > 1]
    one = [s for s, n in PLAN.items() if n == 1]
    seeds_of = lambda scheme: ", ".join(str(k) for k in range(PLAN[scheme]))  # noqa: E731
    time = (
        f"the runs recorded {machine['hours']:.2f} h of training and evaluation"
        if "hours" in machine
        else "no time recorded"
    )
    if seconds:
        low, high = f"{min(seconds):.0f}", f"{max(seconds):.0f}"
        each = f"{low}-{high}" if low != high else low
        time += f" ({each} s per run, `machine.seconds_per_run`)"
    trained = trained_length(schemes)
    return [
        "## How it was run",
        "",
        "```sh",
        "make ablation   # = make setup data, then python -m launch.study configs/ablation "
        "--out docs/ablation, then python -m launch.ablation",
        "```",
        "",
        f"- **Machine**: {machine.get('machine', 'not recorded')}; {time}.",
        f"- **Runs**: {len(ran & set(planned))} of the {len(planned)} runs of `configs/ablation/` "
        "are in the summary"
        + (f" (missing: {', '.join(absent)})" if absent else "")
        + ". Every config builds on `configs/ablation/base.yaml`, the study's "
        "(`configs/study/base.yaml`: model, data, budget, schedule, evaluation; docs/study.md "
        '"How it was run"), and differs from it only in `model.scheme` and `run.seed` '
        "(`tests/evaluation/test_ablation.py` checks this).",
        f"- **Seeds**: run.seed {seeds_of(many[0])} for {_listing(many)}; run.seed 0 only for "
        f"{_listing(one)}. Seeds in the summary: "
        + (", ".join(f"{s} {len(e['runs'])}" for s, e in schemes.items()) or "none")
        + ".",
        f"- **Evaluation**: perplexity on the same held-out text at {', '.join(lengths)} tokens"
        + (f"; trained length {trained}" if trained else "")
        + ".",
        f"- **Noise**: at each length, the largest seed spread (half the range) among "
        f"{_listing(list(NOISE_SCHEMES))}.",
        "",
    ]


def _sentence(text: str) -> str:
    """A verdict as a sentence: capitalised, ending in a full stop."""
    text = text[:1].upper() + text[1:]
    return text if text.endswith(".") else text + "."


def _verdicts(head: str, parts: list[dict]) -> list[str]:
    """The question's answer, then one item per comparison (scheme names as they are)."""
    items = [r["verdict"] if r["verdict"].endswith(".") else r["verdict"] + "." for r in parts]
    return [f"**Verdict.** {head}", "", *[f"- {item}" for item in items], ""]


def render(summary: dict, plot: str, results: str) -> str:
    """docs/ablation.md from launch.study's summary.json (`plot`, `results`: links to its plot
    and results.md relative to the report)."""
    schemes = _ordered(summary.get("schemes", {}))
    machine = summary.get("machine", {})
    lengths = lengths_of(schemes)
    beyond = sorted({n for e in schemes.values() for n in e["ppl_beyond"]}, key=int)
    q1 = factor_steps(schemes)
    q2 = scaled_gap(schemes)
    q3 = [gate_comparison(schemes, c, r) for c, r in GATES]
    q4 = [hybrid_beats_references(schemes, v) for v in HYBRIDS]

    winners = [
        f"{r['challenger']} beats {r['reference']}" for r in q3 if r.get("outcome") == "beats"
    ]
    if winners:
        q3_head = f"Yes where {_listing(winners)}."
    elif all("outcome" in r for r in q3):
        q3_head = "No: no gate beats the bias it replaces at every length."
    else:
        q3_head = "Not all measured yet; none beats its bias so far."
    q3_table = _margin_table(
        [
            (
                f"{r['challenger']} - {r['reference']}",
                {n: f"{d:+.2f} ± {r['margin'][n]:.2f}" for n, d in r["diff"].items()},
            )
            for r in q3
            if "diff" in r
        ]
    )
    if q3_table:
        q3_table = [
            "Each gate minus the bias it replaces (mean perplexity, ± the two schemes' seed "
            "spreads together; negative: the gate is better):",
            "",
            *q3_table,
        ]

    beaters = [r["variant"] for r in q4 if r.get("beats")]
    if beaters:
        q4_head = f"Yes: {_listing(beaters)}."
    elif all("margin" in r for r in q4):
        q4_head = "No variant does."
    else:
        q4_head = "Not all measured yet; none does so far."
    q4_table = _margin_table(
        [
            (r["variant"], {n: f"{m:+.2f}" for n, m in r["margin"].items()})
            for r in q4
            if "margin" in r
        ]
    )
    if q4_table:
        q4_table = [
            "Margin: the lower of alibi's and path_alibi's mean - spread, minus the variant's "
            "mean + spread (positive: better than both beyond the spreads):",
            "",
            *q4_table,
        ]

    if schemes:
        results_lines = [
            "## Results",
            "",
            "Perplexity over all positions by evaluation length (mean ± spread over seeds where a "
            "scheme has several):",
            "",
            ppl_table(schemes, "ppl", lengths),
            "Perplexity of the positions beyond the trained length only:",
            "",
            ppl_table(schemes, "ppl_beyond", beyond),
            f"[results.md]({results}) (written by launch.study) also holds the ratios to the "
            "trained length, the attention diagnostics and the drift of the learned rotations.",
            "",
        ]
    else:
        results_lines = ["## Results", "", "No run is in the summary yet.", ""]
    return "\n".join(
        [
            "# The ablation of the hybrid",
            "",
            "Which of the hybrid's factors cost it its deficit to alibi and path_alibi in the "
            "study (docs/study.md, claim 7), and do the new parameterizations (scaled increments, "
            "forget gates) change that? Every number below comes from the ablation's "
            "`summary.json` and every verdict is computed from them by "
            "`python -m launch.ablation`.",
            "",
            f"![perplexity by length, one curve per scheme]({plot})",
            "",
            *_how_it_was_run(schemes, machine, lengths),
            *results_lines,
            "## The questions",
            "",
            "### Q1. Which factor costs the hybrid its deficit to alibi?",
            "",
            "The chain alibi -> rope_alibi (RoPE on q, k) -> vorope_alibi (values rotated too) -> "
            "hybrid (learned free increments instead of RoPE's), the side step rope_alibi -> "
            "accrot_alibi and the new parameterization hybrid -> hybrid_scaled: the change of mean "
            "perplexity at each step (positive: worse), at the trained and the longest length. A "
            "step counts where its change exceeds the noise.",
            "",
            *_factor_section(q1),
            f"**Verdict.** {_sentence(q1['verdict'])}",
            "",
            "### Q2. Do scaled increments close accrot's gap to RoPE at the trained length?",
            "",
            "Closed if accrot_scaled is within the noise of rope; narrowed if its gap is smaller "
            "than accrot's by more than the noise.",
            "",
            f"**Verdict.** {_sentence(q2['verdict'])}",
            "",
            "### Q3. Does a data-dependent forget gate beat ALiBi?",
            "",
            "A gate beats the bias it replaces if it is better by more than the two schemes' "
            "seed spreads together at every length, and loses if it is worse by more at every "
            "length. A scheme trained with one seed has no spread of its own and counts the "
            "noise instead.",
            "",
            *q3_table,
            *_verdicts(q3_head, q3),
            "### Q4. Does any hybrid variant beat path_alibi and alibi beyond the seed spread at "
            "every length?",
            "",
            *q4_table,
            *_verdicts(q4_head, q4),
        ]
    )
