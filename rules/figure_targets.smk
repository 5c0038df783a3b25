# Which figures exist depends on which stages the config enables (no data, no figure).
# Functions only: the rules that use them live in rules/figures.smk.

FIGURE_FORMATS = ("png", "pdf")


def figure_families():
    """Figure families (one notebook each) whose inputs the config produces, in reading order."""
    families = []
    if depth_variants():
        families.append("depth_curves")
    if width_variants():
        families.append("width_curves")
    if moe_metrics():
        families += ["moe_recovery", "expert_load"]
    if families:
        families.append("quality_speed")
    return families


def figure_targets():
    """Figure files (PNG and PDF) for the stages present in the config."""
    return [f"{R}/figures/{name}.{ext}" for name in figure_families() for ext in FIGURE_FORMATS]


def figure_tables():
    """The tidy tables that exist for this config (the quality-vs-speed figure reads all of them)."""
    tables = []
    if depth_variants() or width_variants():
        tables.append(f"{R}/tables/probes.csv")
    if moe_metrics():
        tables.append(f"{R}/tables/moe.csv")
    return tables


def figure_output(name, subcategory):
    """PNG and PDF of one figure family, both in `snakemake --report` with workflow/report/<name>.rst."""
    return {
        ext: report(
            f"{R}/figures/{name}.{ext}",
            caption=f"../workflow/report/{name}.rst",
            category="Figures",
            subcategory=subcategory,
            labels={"figure": name.replace("_", " "), "format": ext.upper()},
        )
        for ext in FIGURE_FORMATS
    }


def papermill_yaml(**values):
    """papermill `-y` argument: list-valued parameters as one shell-quoted JSON (= YAML) document."""
    return spec({key: list(value) for key, value in values.items()})
