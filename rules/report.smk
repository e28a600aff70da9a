# The final aggregation stage: every table of results/tables/ as Markdown, booktabs LaTeX, an HTML
# view for `snakemake --report` and a provenance sidecar; the paper layouts; the provenance table;
# the figures drawn from the tables. Which tables exist, and what the layouts are built from, is
# actsparse.publish.TABLES; which figures, and from which tables, actsparse.publish.FIGURES.
from actsparse.publish import FIGURES, TABLES, figure_path, table_path


report: "../report/workflow.rst"


# the tables earlier rules write that the workflow targets (speed only when configured)
EARLIER = [name for name, table in TABLES.items() if table.build is None and table_path(name) in final_targets()]
# what each table this stage builds is read from: a paper layout its sources, the provenance table
# every JSON result and every other table's sidecar
BUILT_FROM = {name: expand(table.sources, model=MODELS) for name, table in TABLES.items() if table.sources}
BUILT_FROM["layer_sparsity"] = ppl_results()
BUILT_FROM["provenance"] = (
    [table_path(name, ".provenance.json") for name in EARLIER + list(BUILT_FROM)]
    + ppl_results()
    + task_results()
    + speed_results()
    + expand(rules.pattern_match.output.summary, model=MODELS)
    + expand(rules.pattern_predictor.output.summary, model=MODELS)
)
# what table {table} is rendered into beside its CSV; the HTML view goes into the report
RENDERED = dict(
    md=table_path("{table}", ".md"),
    tex=table_path("{table}", ".tex"),
    html=report(
        table_path("{table}", ".html"),
        caption="../report/table.rst",
        category=lambda wildcards: TABLES[wildcards.table].category,
        subcategory="Tables",
        labels=lambda wildcards: {"table": TABLES[wildcards.table].title},
    ),
    provenance=table_path("{table}", ".provenance.json"),
)
# the title and description the HTML view and the report caption show
DESCRIBED = dict(
    title=lambda wildcards: TABLES[wildcards.table].title,
    about=lambda wildcards: TABLES[wildcards.table].about,
)


rule render_table:
    input:
        table_path("{table}"),
    output:
        **RENDERED,
    params:
        **DESCRIBED,
    wildcard_constraints:
        table=alternatives(EARLIER),
    log:
        f"{LOGS}/render_table/{{table}}.log",
    conda:
        ENV
    script:
        "../workflow_scripts/report_table.py"


rule build_table:
    input:
        lambda wildcards: BUILT_FROM[wildcards.table],
    output:
        csv=table_path("{table}"),
        **RENDERED,
    params:
        **DESCRIBED,
    wildcard_constraints:
        table=alternatives(BUILT_FROM),
    log:
        f"{LOGS}/build_table/{{table}}.log",
    conda:
        ENV
    script:
        "../workflow_scripts/report_build.py"


rule draw_figure:
    input:
        lambda wildcards: [table_path(name) for name in FIGURES[wildcards.figure].tables],
    output:
        png=report(
            figure_path("{figure}"),
            caption="../report/figure.rst",
            category=lambda wildcards: FIGURES[wildcards.figure].category,
            subcategory="Figures",
            labels=lambda wildcards: {"figure": FIGURES[wildcards.figure].title},
        ),
        pdf=figure_path("{figure}", ".pdf"),
    params:
        title=lambda wildcards: FIGURES[wildcards.figure].title,
        about=lambda wildcards: FIGURES[wildcards.figure].about,
    wildcard_constraints:
        figure=alternatives(FIGURES),
    log:
        f"{LOGS}/draw_figure/{{figure}}.log",
    conda:
        ENV
    script:
        "../workflow_scripts/draw_figure.py"
