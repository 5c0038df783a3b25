# Figures: papermill notebooks turning the tables into PNG/PDF figures (see rules/figure_targets.smk).
