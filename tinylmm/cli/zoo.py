"""`tinylmm zoo ls` and `tinylmm zoo show`: the presets, from their embedded configs (offline)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tinylmm import api
from tinylmm.catalog.zoo import parse_count
from tinylmm.sizes import fmt_bytes, parse_size

app = typer.Typer(help="The model zoo: list the presets, show one in full.", no_args_is_help=True)

ZOO_HELP = "a YAML file of your own presets (model_zoo.yaml's schema), added to the shipped ones"


def _billions(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"


def _terms(r: dict) -> str:
    marks = (["gated"] if r["gated"] else []) + (["non-commercial"] if r["commercial"] is False else [])
    return ", ".join(marks) or "open"


@app.command("ls")
def ls(
    family: Optional[str] = typer.Option(
        None, "--family", help="LLM family: phi2, qwen2.5, qwen3, llama3.2, gemma2 ..."
    ),
    vision: Optional[str] = typer.Option(None, "--vision", help="vision family: siglip, siglip2, clip ..."),
    max_params: Optional[str] = typer.Option(
        None, "--max-params", help="at most this many parameters in all, e.g. 2B, 800M"
    ),
    template: Optional[str] = typer.Option(None, "--template", help="conversation template: auto, phi, llama ..."),
    commercial: bool = typer.Option(False, "--commercial", help="only presets whose licences allow commercial use"),
    ungated: bool = typer.Option(False, "--ungated", help="only presets that download without accepting a licence"),
    zoo_file: Optional[Path] = typer.Option(None, "--zoo", help=ZOO_HELP),
    json_out: bool = typer.Option(False, "--json", help="print the rows as JSON"),
):
    """List the presets: LLM and vision families, parameters, visual tokens per image, template, licence
    terms (gated, non-commercial), the recommended recipe and --tune."""
    import json

    from rich.console import Console
    from rich.table import Table

    api.register_zoo(zoo_file)
    rows = api.zoo_select(
        family=family,
        vision=vision,
        template=template,
        max_params=parse_count(max_params) if max_params else None,
        commercial=True if commercial else None,
        gated=False if ungated else None,
    )
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.markup import escape

    table = Table(title=f"model zoo: {len(rows)} presets", title_justify="left")
    width = max((len(r["name"]) for r in rows), default=4)
    table.add_column("name", style="bold", no_wrap=True, min_width=width)
    for col, justify in (
        ("LLM", "left"),
        ("vision", "left"),
        ("params", "right"),
        ("tokens", "right"),
        ("template", "left"),
        ("terms", "left"),
        ("recipe/tune", "left"),
    ):
        table.add_column(col, justify=justify)
    for r in rows:
        rec = f"{r['recipe']}/{r['tune']}" if r["recipe"] else "-"
        table.add_row(
            r["name"],
            r["family"] or "-",
            r["vision_family"] or "-",
            _billions(r["params"]),
            str(r["visual_tokens"] or "-"),
            r["template"],
            _terms(r),
            rec,
        )
    console = Console()
    console.print(table)
    missing = {r["unavailable"] for r in rows if r["unavailable"]}
    for reason in sorted(missing):
        console.print(f"[dim]-: {escape(reason)}[/dim]", highlight=False)


@app.command("show")
def show(
    name: str = typer.Argument(..., help="a preset name (tinylmm zoo ls)"),
    budget: str = typer.Option("24GB", "--budget", help="GPU memory the plan is weighed against"),
    zoo_file: Optional[Path] = typer.Option(None, "--zoo", help=ZOO_HELP),
    json_out: bool = typer.Option(False, "--json", help="print everything as JSON"),
):
    """Everything about one preset: its entry, parameters per part, image input, licence, scores, memory plan."""
    import json

    import yaml
    from rich.console import Console
    from rich.table import Table

    api.register_zoo(zoo_file)
    d = api.zoo_describe(name, parse_size(budget))
    if json_out:
        typer.echo(json.dumps(d, indent=2))
        return
    out = Console()
    out.print(f"[bold]{d['name']}[/bold]: {d['description']}", highlight=False)
    out.print(f"[dim]from {d['source']}[/dim]", highlight=False)
    facts = Table(show_header=False, box=None)
    facts.add_column(style="bold")
    facts.add_column()
    img = d["image"]
    rows = [
        (
            "LLM",
            f"{d['model']['llm'].get('name_or_path') or '(inline config)'} ({d['family']}, {d['model_types']['llm']})",
        ),
        (
            "vision tower",
            f"{d['model']['vision'].get('name_or_path') or '(inline config)'} ({d['vision_family']}, "
            f"{d['model_types']['vision']})",
        ),
        ("connector", str(d["model"].get("connector", {}).get("type", "mlp2x_gelu"))),
        ("template", str(d["model"].get("template", "phi"))),
        ("visual tokens", f"{d['visual_tokens']} per image"),
        (
            "image",
            f"{img['size']} x {img['size']} px, patch {img['patch_size']}; "
            f"{'padded to a square with the mean colour, ' if img['pad_to_square'] else ''}resized "
            f"({img['resize']}); normalised with mean {img['mean']} std {img['std']}",
        ),
        (
            "licence",
            f"{d['licence'] or '-'}"
            + (" [gated]" if d["gated"] else "")
            + (" [non-commercial]" if d["commercial"] is False else ""),
        ),
        (
            "recommended",
            f"--recipe {d['recommended']['recipe']} --tune {d['recommended']['tune']}" if d["recommended"] else "-",
        ),
    ]
    for k, v in rows:
        facts.add_row(k, v)
    out.print(facts)

    p = d["params"]
    params = Table(title="parameters (meta device, from the architecture configs)", title_justify="left")
    params.add_column("part")
    params.add_column("parameters", justify="right")
    params.add_row("LLM (embedding grown for <image> where needed)", f"{p['llm']:,}")
    params.add_row(
        f"vision tower, cut at feature layer {d['model']['vision'].get('feature_layer', -2)}", f"{p['vision']:,}"
    )
    params.add_row("connector", f"{p['connector']:,}")
    params.add_row("[bold]total[/bold]", f"[bold]{p['total']:,}[/bold] ({_billions(p['total'])})", end_section=True)
    params.add_row("[dim]vision tower uncut (every layer, head)[/dim]", f"[dim]{p['vision_full']:,}[/dim]")
    out.print(params)

    if d["scores"]:
        scores = Table(title="reported scores", title_justify="left")
        for bench in d["scores"]:
            scores.add_column(bench, justify="right")
        scores.add_row(*(str(v) for v in d["scores"].values()))
        out.print(scores)
        out.print(f"[dim]source: {d['scores_source']}[/dim]", highlight=False)
    for extra in ("stage_defaults", "run"):
        if d[extra]:
            out.print(
                f"[bold]{extra}[/bold]:\n"
                + yaml.safe_dump(d[extra], sort_keys=False, default_flow_style=None, width=100).rstrip(),
                highlight=False,
            )

    plan = d["plan"]
    if plan:
        t = Table(
            title=f"memory plan: --recipe {plan['recipe']} --tune {plan['tune']}, one GPU, "
            f"budget {fmt_bytes(plan['budget'])} (tinylmm plan for the breakdown)",
            title_justify="left",
        )
        for col in ("stage", "vision / connector / llm", "micro-batch x tokens", "peak", "fits", "largest micro-batch"):
            t.add_column(col, justify="right" if col in ("peak", "largest micro-batch") else "left")
        for s in plan["stages"]:
            tune = " / ".join(s["tune"][c] for c in ("vision", "connector", "llm"))
            t.add_row(
                s["name"],
                tune,
                f"{s['micro_batch']} x {s['seq_len']}",
                fmt_bytes(s["peak"]),
                "[green]yes[/green]" if s["fits"] else "[red]no[/red]",
                str(s["max_micro_batch"]),
            )
        out.print(t)
    for note in d["notes"]:
        out.print(f"[dim]note: {note}[/dim]", highlight=False)
