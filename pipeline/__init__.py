"""Training pipeline for CondConv models: Lightning modules, data, sweeps, tracking, frontier."""
