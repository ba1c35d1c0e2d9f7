"""Experiment presets: functions returning the `fdl.Config` of a whole experiment."""
