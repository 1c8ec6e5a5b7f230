"""Every registered defense has a unique name, a paper record and a CLI command."""

from ftsafety.cli import app
from ftsafety.defenses import DEFENSES


def test_registry_complete_and_wired():
    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert len({d.command for d in DEFENSES.values()}) == len(DEFENSES) == 5
    for name, d in DEFENSES.items():
        assert d.name == name and d.stage in ("align", "finetune", "post")
        assert d.paper.title and d.paper.arxiv and d.paper.code and d.neutral
        assert d.command in commands, d.command
        assert d.config_cls.__dataclass_fields__


def test_python_api_exports_resolve():
    """`from ftsafety import ...` gives the library the CLI uses (issue 18), lazily."""
    import transformers

    import ftsafety

    for name in ftsafety.__all__:
        assert getattr(ftsafety, name) is not None, name
    assert issubclass(ftsafety.VaccineTrainer, transformers.Trainer)
    assert issubclass(ftsafety.LisaTrainer, transformers.Trainer)
    from ftsafety.defenses import rollback

    assert ftsafety.recover_rollback is rollback.run
