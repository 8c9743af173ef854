import pytest

from sleepctl.errors import RecipeError
from sleepctl.recipe import RECIPES_DIR, load_recipe, parse_overrides
from sleepctl.seed import prepare


def test_bundled_recipes_validate():
    names = {p.stem for p in RECIPES_DIR.glob("*.yaml")}
    assert {"quick-cpu", "qwen-cpu", "qwen-small-large", "demo-cpu"} <= names
    for n in names:
        r, _ = load_recipe(n)
        assert {"small", "large"} <= set(r.profiles)
    r, _ = load_recipe("qwen-small-large")
    assert r.model_name("small") == "qwen2.5-coder-0.5b" and r.model_name("large") == "qwen2.5-coder-1.5b"


def test_unknown_key_and_bad_value_name_key_and_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("profiles: {large: {model: smollm2-135m}}\nstudent: large\nloss: {lmbda: 2, wibble: 1}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert f"{p}: loss.lmbda: Input should be less than or equal to 1" in msg
    assert f"{p}: loss.wibble: unknown key" in msg


def test_bad_yaml_and_missing_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("profiles: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(p)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="unknown recipe"):
        load_recipe("no-such-recipe")


def test_overrides_keep_types_and_validate():
    ov = parse_overrides(["loss.lmbda=0.25", "training.max_steps=3", "loss.divergence=jsd"])
    r, _ = load_recipe("quick-cpu", ov)
    assert r.loss.lmbda == 0.25 and r.training.max_steps == 3 and r.loss.divergence == "jsd"
    with pytest.raises(RecipeError, match="key=value"):
        parse_overrides(["loss.lmbda"])
    with pytest.raises(RecipeError, match="loss.divergence"):
        load_recipe("quick-cpu", {"loss.divergence": "cosine"})


def test_profiles_and_unknown_profile():
    r = prepare(None, "small", "large", None)
    assert r.teacher == "small" and r.model_name("large") == "smollm2-135m"
    assert prepare(None, "self", None, None).teacher == "self"
    with pytest.raises(RecipeError, match="unknown teacher profile 'medium'"):
        prepare(None, "medium", None, None)
    with pytest.raises(RecipeError, match="unknown student profile"):
        prepare(None, None, "self", None)


def test_a_source_tree_without_install_reads_the_repo_recipes(monkeypatch):
    """On the GPU machine the package runs from a copied source tree on PYTHONPATH, where the
    `sleepctl.recipes` mapping of pyproject does not exist: recipes come from the repo's recipes/."""
    from sleepctl import recipe as rmod

    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(rmod, "files", missing)
    folder = rmod._recipes_dir()
    assert (folder / "qwen-small-large.yaml").is_file()
    assert folder.resolve() == (rmod.Path(rmod.__file__).resolve().parent.parent / "recipes").resolve()
