import inspect

import explora


def test_every_public_name_exists_and_is_documented():
    for name in explora.__all__:
        obj = getattr(explora, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), f"explora.{name} has no docstring"


def test_cli_lists_every_command(capsys):
    from explora.cli.main import main

    assert main([]) == 1
    out = capsys.readouterr().out
    for cmd in ("demo", "pretrain", "finetune", "linprobe", "knn", "report", "params", "export", "data", "analyze",
                "segment", "predict"):
        assert cmd in out
