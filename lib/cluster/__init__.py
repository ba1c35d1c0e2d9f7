"""Running experiments elsewhere than in this process: Slurm jobs (`slurm`), sweeps of one
experiment over a grid of values, run one after another here or as one job array (`sweep`),
and side-by-side views of finished or running runs (`compare`)."""
