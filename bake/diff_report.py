"""The `bake diff` report as one self-contained HTML page (no scripts, no external files): the
verdict, summary statistics, and per prompt the KL, top-1 agreement and both greedy continuations
side by side with the first differing token marked."""

from __future__ import annotations

import html
from pathlib import Path

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.4em}.pass{color:#17692e}.fail{color:#b3261e}
table{border-collapse:collapse;width:100%;margin:1em 0}th,td{border:1px solid #ddd;padding:.35em .5em;
vertical-align:top;text-align:left}th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.diverged td{background:#fff8e6}.cont{font-family:ui-monospace,monospace;white-space:pre-wrap;font-size:12.5px}
.bar{display:inline-block;height:.7em;background:#d9822b;vertical-align:middle;margin-left:.4em}
"""


def _e(x) -> str:
    return html.escape(str(x))


def render(result: dict, meta: dict, failed: list[str]) -> str:
    s = result["summary"]
    verdict = ("<p class='fail'><b>FAIL</b>: " + "; ".join(_e(f) for f in failed) + "</p>" if failed
               else "<p class='pass'><b>PASS</b>: no threshold crossed</p>")
    kmax = max((r["kl_mean"] for r in result["rows"]), default=0.0) or 1.0
    rows = []
    for i, r in enumerate(result["rows"]):
        width = int(80 * r["kl_mean"] / kmax)
        div = "" if r["greedy_same"] else f" (differs from token {r['first_divergence'] + 1})"
        rows.append(
            f"<tr class='{'same' if r['greedy_same'] else 'diverged'}'><td class='num'>{i + 1}</td>"
            f"<td>{_e(r['prompt'])}</td><td class='num'>{r['kl_mean']:.4g}<span class='bar' style='width:{width}px'>"
            f"</span></td><td class='num'>{r['kl_max']:.4g}</td><td class='num'>{r['top1_agreement']:.3f}</td>"
            f"<td class='cont'>{_e(r['original'])}</td><td class='cont'>{_e(r['steered'])}{_e(div)}</td></tr>")
    meta_rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in meta.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>bake diff: {_e(meta.get('steered', ''))}</title>
<style>{CSS}</style></head><body>
<h1>bake diff</h1>
{verdict}
<table><tbody>{meta_rows}</tbody></table>
<h2>Summary</h2>
<table><thead><tr><th>prompts</th><th>positions</th><th>mean KL(original ‖ steered)</th><th>max KL</th>
<th>worst prompt's mean KL</th><th>top-1 agreement</th><th>greedy continuations identical</th></tr></thead>
<tbody><tr><td class="num">{s['prompts']}</td><td class="num">{s['positions']}</td><td class="num">{s['kl_mean']:.4g}</td>
<td class="num">{s['kl_max']:.4g}</td><td class="num">{s['kl_prompt_max']:.4g}</td>
<td class="num">{s['top1_agreement']:.4f}</td><td class="num">{s['greedy_same']}/{s['prompts']}</td></tr></tbody></table>
<h2>Per prompt</h2>
<table><thead><tr><th>#</th><th>prompt</th><th>mean KL</th><th>max KL</th><th>top-1</th>
<th>original, greedy {s['max_new_tokens']} tokens</th><th>steered</th></tr></thead>
<tbody>{''.join(rows)}</tbody></table>
</body></html>
"""


def write(path: Path, result: dict, meta: dict, failed: list[str]) -> None:
    from .evaluation import write_text_atomic

    write_text_atomic(path, render(result, meta, failed))
