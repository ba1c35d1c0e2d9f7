"""diffuse_nnx configs (ml_collections `ConfigDict`s naming components by `*_class` strings),
run as experiment graphs of the presets beside this package:

    config_files.py  loads `--config=PATH.py[:OPTIONS]` from the user's diffuse_nnx checkout
    registry.py      the `*_class` names -> this project's classes
    converter.py     a loaded ConfigDict -> fdl.Config(Experiment), starting from the blocks of
                     experiments/common.py
"""
