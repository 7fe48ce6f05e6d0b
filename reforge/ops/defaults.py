"""The method's default weights, one home for the API, the command line and recipes. It imports nothing, so a
command's options name these numbers without slowing ``--help``."""

PAPER_ALPHA = 0.5  # RE-AdaptIR's weight of a knowledge adapter (base + 0.5 Psi + Delta): each --adapter's default
PAPER_BETA = 1.0  # RE-AdaptIR keeps the retriever's Delta whole: merge's --beta, tune's --beta grid
DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)  # tune's --alpha grid: the retriever itself (0) up to twice PAPER_ALPHA
