"""The depth ablation of He et al. 2015: the plain/residual x depth x seed grid and its report.

`grid.run_grid` trains the grid (skipping finished runs, resuming interrupted ones);
`report.write_report` turns the run directories into Table 6 (markdown, CSV) and the figures.
"""
