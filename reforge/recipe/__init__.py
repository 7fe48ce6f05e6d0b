"""Recipes: one YAML file describes a whole RE-AdaptIR experiment, and `run_recipe` runs it (`reforge run`).

    >>> from reforge.recipe import load_recipe, run_recipe  # doctest: +SKIP
    >>> report = run_recipe("recipes/miniature.yaml", dry_run=True)  # doctest: +SKIP
    >>> [(p.job.id, p.action) for p in report.jobs]  # doctest: +SKIP
    [('psi/scifact', 'run'), ('readapted/scifact-alpha0.5', 'run'), ('eval/scifact', 'run')]

`reforge.recipe.spec` reads and checks the file, `reforge.recipe.plan` expands its steps into jobs,
`reforge.recipe.runner` runs them, `reforge.recipe.table` writes the paper's table.
"""

from reforge.errors import RecipeError
from reforge.recipe.runner import JobPlan, RunReport, run_recipe
from reforge.recipe.spec import Recipe, load_recipe

__all__ = ["JobPlan", "Recipe", "RecipeError", "RunReport", "load_recipe", "run_recipe"]
