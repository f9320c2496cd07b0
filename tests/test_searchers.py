"""A search algorithm restored from a state saved before Tune's trial list (a driver killed between Tune's files)
made to agree with the trials Tune restored: `searchers.follow_restored_trial`, on Tune's real search classes and
Optuna. The killed studies of test_beyond_grids (Optuna, BOHB) and test_fault_tolerance (a grid) do the same on a
real Ray; here each piece is checked alone, in a second."""

from __future__ import annotations

import copy

import pytest
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, SearchGenerator

from ray_cifar.tuning.searchers import follow_restored_trial
from ray_cifar.tuning.variants import RestorableVariants

SPACE = {"optim.lr": tune.loguniform(1e-6, 0.2), "optim.momentum": tune.choice([0.0, 0.9])}


class Restored:
    """What follow_restored_trial reads of Tune's controller: its search algorithm and its trials."""

    def __init__(self, search_alg, trials):
        self.search_alg, self.trials = search_alg, trials

    def get_trials(self):
        return self.trials


def trial(trial_id: str, config: dict, status: str, last_result: dict | None = None, made: int | None = None) -> Trial:
    """A Tune trial as a restore brings it back; MADE: its number in creation order (its experiment tag's)."""
    t = Trial("__fake", config=config, stub=True, trial_id=trial_id,
              experiment_tag=f"{made}_optim.lr={config.get('optim.lr')}" if made else "")
    t.set_status(status)
    t.run_metadata.last_result = last_result or {}
    return t


def make(kind: str):
    """A fresh RestorableOptuna, RestorableHyperOpt or RestorableBOHB over SPACE, as a study makes one (seed 0,
    val_acc, max)."""
    pytest.importorskip({"optuna": "optuna", "hyperopt": "hyperopt", "bohb": "hpbandster"}[kind])
    from ray_cifar.tuning.restorable_searchers import RestorableBOHB, RestorableHyperOpt, RestorableOptuna

    if kind == "hyperopt":
        made = RestorableHyperOpt(random_state_seed=0, metric="val_acc", mode="max")
    else:
        made = (RestorableOptuna if kind == "optuna" else RestorableBOHB)(seed=0, metric="val_acc", mode="max")
    made.set_search_properties("val_acc", "max", SPACE)
    return made


def restored_optuna(saved_at, max_concurrent: int = 2):
    """A fresh searcher given the state saved at SAVED_AT, inside Tune's wrappers as a restore builds them."""
    searcher = make("optuna")
    searcher.restore(saved_at)
    return SearchGenerator(ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)), searcher


def saved_after_two(kind: str, tmp_path):
    """A searcher of KIND that suggested a and b, saved, then suggested c (the driver died before c was saved):
    (where it was saved, the three configs)."""
    searcher = make(kind)
    configs = {tid: searcher.suggest(tid) for tid in ("a", "b")}
    saved_at = str(tmp_path / "searcher-state.pkl")
    searcher.save(saved_at)
    configs["c"] = searcher.suggest("c")
    return saved_at, configs


def test_a_restored_optuna_takes_the_trial_its_state_lacks_and_the_end_of_one_it_missed(tmp_path, capsys):
    saved_at, configs = saved_after_two("optuna", tmp_path)
    alg, searcher = restored_optuna(saved_at)
    alg._counter, alg.searcher.live_trials = 2, {"a", "b"}  # as saved with a and b running
    alg.searcher.num_unfinished_live_trials = 2
    # Tune's list: a ended since the searcher's save (ASHA stopped it), b runs, c was made after the save.
    trials = [trial("a", configs["a"], Trial.TERMINATED, {"val_acc": 0.3, "training_iteration": 1}, made=1),
              trial("b", configs["b"], Trial.PENDING, made=2), trial("c", configs["c"], Trial.PENDING, made=3)]
    controller = Restored(alg, [])
    for t in trials:
        controller.trials.append(t)
        follow_restored_trial(controller, t)
    assert alg._counter == 3  # else it makes a fifth trial of four
    assert alg.searcher.live_trials == {"b", "c"} and alg.searcher.num_unfinished_live_trials == 2  # a's slot freed
    assert capsys.readouterr().out.count("was made after Optuna's last saved state") == 1  # c's
    # c drawn again from the state saved just before it: the same values, so Optuna's study is what it would be
    # had the driver lived: a told with its last result, b and c running with their own values, nothing failed.
    study = searcher._ot_study.trials
    assert [t.state.name for t in study] == ["COMPLETE", "RUNNING", "RUNNING"] and study[0].value == 0.3
    assert searcher._ot_trials["c"].params == configs["c"]
    searcher.on_trial_result("c", {"val_acc": 0.4, "training_iteration": 1})  # Ray's OptunaSearch: KeyError here
    searcher.on_trial_complete("c", {"val_acc": 0.4})
    assert searcher.suggest("d") != configs["c"]  # the next draw is not c's again


def held_by(searcher, kind: str) -> list[tuple[str, str, dict]]:
    """What Optuna's or HyperOpt's own record holds, in the order it took them: (trial id, state, values); a failed
    draw is no trial's ("")."""
    if kind == "optuna":
        ids = {t.number: tid for tid, t in searcher._ot_trials.items()}
        return [(ids.get(t.number, ""), t.state.name, t.params) for t in searcher._ot_study.trials]
    import hyperopt

    ids = {number: tid for tid, (number, _) in searcher._live_trial_mapping.items()}
    names = {hyperopt.JOB_STATE_NEW: "RUNNING", hyperopt.JOB_STATE_DONE: "COMPLETE", hyperopt.JOB_STATE_ERROR: "FAIL"}
    return [(ids.get(t["tid"], ""), names[t["state"]], {k: v[0] for k, v in t["misc"]["vals"].items()})
            for t in searcher._hpopt_trials._dynamic_trials]


def made_after_the_save(kind: str, tmp_path) -> tuple:
    """A searcher of KIND that made a and b, was saved, then made c as ASHA stopped a and d as it stopped b:
    (that searcher, a copy restored from the save inside Tune's wrappers, Tune's trials newest result first)."""
    searcher = make(kind)
    configs = {tid: searcher.suggest(tid) for tid in ("a", "b")}
    saved_at = str(tmp_path / "searcher-state.pkl")
    searcher.save(saved_at)
    ended = {"val_acc": 0.3, "training_iteration": 1}
    for stopped, made in (("a", "c"), ("b", "d")):
        searcher.on_trial_complete(stopped, ended)
        configs[made] = searcher.suggest(made)
    restored = make(kind)
    restored.restore(saved_at)
    alg = SearchGenerator(ConcurrencyLimiter(restored, max_concurrent=2))
    alg._counter, alg.searcher.live_trials, alg.searcher.num_unfinished_live_trials = 2, {"a", "b"}, 2
    # d reported last; b ended after c's last result (an end told on the way is a use of the searcher, too).
    newest_result_first = [trial("d", configs["d"], Trial.RUNNING, {"val_acc": 0.1, "training_iteration": 1}, made=4),
                           trial("b", configs["b"], Trial.TERMINATED, ended, made=2),
                           trial("c", configs["c"], Trial.RUNNING, {"val_acc": 0.2, "training_iteration": 1}, made=3),
                           trial("a", configs["a"], Trial.TERMINATED, ended, made=1)]
    return searcher, restored, Restored(alg, []), newest_result_first


@pytest.mark.parametrize("kind", ["optuna", "hyperopt"])
def test_two_trials_tune_adds_back_newest_result_first_are_drawn_again_in_the_order_they_were_made(kind, tmp_path):
    """Tune adds a restored study's trials back newest result first, not in the order they were made. A searcher
    saved before two trials were made drew each of them again in Tune's order: each draw had the other's values
    (a CI's killed Optuna study held two failed draws beside its four trials). In creation order, the restored
    searcher holds what an uninterrupted one holds once Tune has added them all, and draws the same next trial."""
    searcher, restored, controller, trials = made_after_the_save(kind, tmp_path)
    for t in trials:
        controller.trials.append(t)
        follow_restored_trial(controller, t)
    assert held_by(restored, kind) == held_by(searcher, kind)  # before any use: a study may end right here
    assert [state for _, state, _ in held_by(restored, kind)] == ["COMPLETE"] * 2 + ["RUNNING"] * 2
    assert restored.suggest("e") == searcher.suggest("e")


def test_a_trial_whose_place_is_unknown_is_adopted_at_the_searchers_next_use(tmp_path):
    """No creation number (Tune's tag starts with one): held until Tune is done adding (the first use), as the
    first of the trials with none."""
    searcher, restored, controller, trials = made_after_the_save("optuna", tmp_path)
    for t in trials:
        t.experiment_tag = ""
        controller.trials.append(t)
        follow_restored_trial(controller, t)
    assert set(restored._ot_trials) == {"a", "b"}
    restored.on_trial_result("c", {"val_acc": 0.2, "training_iteration": 1})
    assert set(restored._ot_trials) == {"a", "b", "c", "d"}
    assert held_by(restored, "optuna") == held_by(searcher, "optuna")  # (with no number, by trial id: c, then d)


def test_a_trial_whose_values_optuna_would_not_draw_again_is_enqueued_and_the_draw_told_failed(tmp_path):
    saved_at, configs = saved_after_two("optuna", tmp_path)
    alg, searcher = restored_optuna(saved_at)
    other = {"optim.lr": 0.01, "optim.momentum": 0.0}  # not what Optuna draws next
    assert configs["c"] != other
    c = trial("c", other, Trial.PENDING, made=3)
    follow_restored_trial(Restored(alg, [c]), c)
    assert searcher._ot_trials["c"].params == other
    assert [t.state.name for t in searcher._ot_study.trials][-2:] == ["FAIL", "RUNNING"]  # TPE learns from neither


def test_a_trial_made_after_tunes_list_was_written_holds_no_slot_and_no_count(tmp_path):
    """The other order: the searcher's state saved after a trial Tune's list lacks (lost with the driver). Its
    slot would be held for ever (a study of one trial at a time would wait for ever), and the study would make
    one trial fewer than tune.num_samples."""
    saved_at, configs = saved_after_two("optuna", tmp_path)
    alg, _ = restored_optuna(saved_at, max_concurrent=1)
    alg._counter, alg.searcher.live_trials = 3, {"lost"}
    a, b = trial("a", configs["a"], Trial.TERMINATED), trial("b", configs["b"], Trial.TERMINATED)
    controller = Restored(alg, [a, b])
    for t in (a, b):
        follow_restored_trial(controller, t)
    assert alg._counter == 2 and alg.searcher.live_trials == set() and alg.searcher.num_unfinished_live_trials == 0
    assert alg.searcher.suggest("c") is not None  # a free slot


def test_a_new_trial_changes_nothing():
    searcher = make("optuna")
    alg = SearchGenerator(ConcurrencyLimiter(searcher, max_concurrent=2))
    config = alg.searcher.suggest("a")
    alg._counter = 1
    before = (copy.copy(alg.searcher.live_trials), len(searcher._ot_study.trials))
    t = trial("a", config, Trial.PENDING)
    follow_restored_trial(Restored(alg, [t]), t)
    assert (alg.searcher.live_trials, len(searcher._ot_study.trials), alg._counter) == (*before, 1)


@pytest.mark.parametrize("generator", [BasicVariantGenerator, RestorableVariants])  # a study's from before, a new one's
def test_a_grid_restored_from_before_its_last_trial_neither_makes_it_again_nor_keeps_an_ended_ones_slot(generator):
    """Without this a grid study with one trial at a time waited for ever after --resume (seen in
    test_fault_tolerance): the second trial's slot stayed taken, the third trial was to be made again."""
    gen = grid(generator, [1, 2, 3, 4])
    made = [gen.next_trial()]
    gen.on_trial_complete(made[0].trial_id)
    made.append(gen.next_trial())
    saved = copy.deepcopy(gen.get_state())  # b running
    gen.on_trial_complete(made[1].trial_id)
    made.append(gen.next_trial())  # c, made after the save
    restored = generator(max_concurrent=1)
    restored.set_state(saved)
    statuses = [Trial.TERMINATED, Trial.TERMINATED, Trial.PENDING]
    controller = Restored(restored, [])
    for t, status in zip(made, statuses):
        t.set_status(status)
        controller.trials.append(t)
        follow_restored_trial(controller, t)
    assert restored._live_trials == {made[2].trial_id}
    restored.on_trial_complete(made[2].trial_id)
    fourth = restored.next_trial()
    assert fourth.trial_id not in {t.trial_id for t in made} and fourth.config == {"x": 4}
    restored.on_trial_complete(fourth.trial_id)
    assert restored.next_trial() is None and restored.is_finished()  # four trials in all


def grid(generator, points: list[int]):
    tune.register_trainable("__fake", lambda config: None)
    gen = generator(max_concurrent=1)
    gen.add_configurations({"e": {"run": "__fake", "config": {"x": tune.grid_search(points)}}})
    return gen


def test_a_grid_restored_from_after_a_trial_tune_lost_makes_it_again_first_under_its_own_id(capsys):
    """Tune's list was written before b was made, the generator's state after (the driver died between the two
    files): Tune's own generator never made b again (a grid point not run); b is made again, values and id."""
    gen = grid(RestorableVariants, [1, 2, 3])
    a = gen.next_trial()
    gen.on_trial_complete(a.trial_id)
    b = gen.next_trial()  # made, in the generator's saved state, not in Tune's list
    restored = RestorableVariants(max_concurrent=1)
    restored.set_state(copy.deepcopy(gen.get_state()))
    a.set_status(Trial.TERMINATED)
    controller = Restored(restored, [a])
    follow_restored_trial(controller, a)
    assert not restored.is_finished()
    again = restored.next_trial()
    assert (again.trial_id, again.config, again.experiment_tag) == (b.trial_id, {"x": 2}, b.experiment_tag)
    assert "trial %s was made after Tune's last saved trial list" % b.trial_id in capsys.readouterr().out
    controller.trials.append(again)
    follow_restored_trial(controller, again)
    assert restored.next_trial() is None  # one at a time: b runs
    restored.on_trial_complete(again.trial_id)
    c = restored.next_trial()
    assert c.config == {"x": 3} and c.trial_id not in (a.trial_id, b.trial_id)
    controller.trials.append(c)
    follow_restored_trial(controller, c)
    restored.on_trial_complete(c.trial_id)
    assert restored.next_trial() is None and restored.is_finished()  # three trials in all, b once


def test_a_fresh_grid_makes_each_point_once_and_a_plain_restored_one_still_loses_the_trial():
    """RestorableVariants unrestored is Tune's generator; a study begun before it (Tune's own generator in its
    tuner.pkl) resumes as it did: b's point is lost with the driver and the study goes on."""
    gen = grid(RestorableVariants, [1, 2, 3])
    made = []
    while (t := gen.next_trial()) is not None:
        made.append(t)
        gen.on_trial_complete(t.trial_id)
    assert [t.config["x"] for t in made] == [1, 2, 3] and len({t.trial_id for t in made}) == 3 and gen.is_finished()
    old = grid(BasicVariantGenerator, [1, 2, 3])
    a = old.next_trial()
    old.on_trial_complete(a.trial_id)
    old.next_trial()  # b
    restored = BasicVariantGenerator(max_concurrent=1)
    restored.set_state(copy.deepcopy(old.get_state()))
    a.set_status(Trial.TERMINATED)
    follow_restored_trial(Restored(restored, [a]), a)
    assert restored._live_trials == set()
    assert restored.next_trial().config == {"x": 3}


def test_bohb_adopts_only_a_trial_it_never_made(tmp_path, capsys):
    """TuneBOHB forgets a trial's values when it ends: an ended trial restored as Tune saved it is not one it
    never saw (no line, no second record)."""
    searcher = make("bohb")
    ended = searcher.suggest("a")
    searcher.on_trial_complete("a", {"val_acc": 0.3})
    saved_at = str(tmp_path / "searcher-state.pkl")
    searcher.save(saved_at)
    restored = make("bohb")
    restored.restore(saved_at)
    assert not restored.adopt("a", ended) and "a" not in restored.trial_to_params
    assert restored.adopt("b", {"optim.lr": 0.01, "optim.momentum": 0.9})
    assert restored.trial_to_params["b"] == {"optim.lr": 0.01, "optim.momentum": 0.9}
    assert capsys.readouterr().out.count("made after BOHB's last saved state") == 1


def restored_hyperopt(tmp_path):
    """saved_after_two's HyperOpt searcher, restored: (the restored searcher, the three configs)."""
    saved_at, configs = saved_after_two("hyperopt", tmp_path)
    restored = make("hyperopt")
    restored.restore(saved_at)
    return restored, configs


def hyperopt_points(searcher) -> list[tuple[str, float | None]]:
    """Every trial HyperOpt holds, as (state, loss) (TPE reads the done ones; .trials leaves out the failed)."""
    import hyperopt

    names = {hyperopt.JOB_STATE_NEW: "new", hyperopt.JOB_STATE_DONE: "done", hyperopt.JOB_STATE_ERROR: "error"}
    return [(names[t["state"]], t["result"].get("loss")) for t in searcher._hpopt_trials._dynamic_trials]


def test_a_restored_hyperopt_takes_the_trial_its_state_lacks_and_does_not_draw_it_again(tmp_path, capsys):
    """Ray's HyperOptSearch ignored the trial (TPE never learned its result) and drew its values again for the
    next trial: the same point run twice."""
    searcher, configs = restored_hyperopt(tmp_path)
    alg = SearchGenerator(ConcurrencyLimiter(searcher, max_concurrent=2))
    c = trial("c", configs["c"], Trial.PENDING, made=3)
    follow_restored_trial(Restored(alg, [c]), c)
    assert capsys.readouterr().out.count("was made after HyperOpt's last saved state") == 1
    searcher.on_trial_complete("c", {"val_acc": 0.4})
    assert hyperopt_points(searcher) == [("new", None), ("new", None), ("done", -0.4)]  # a and b still running
    assert searcher.suggest("d") != configs["c"]
    assert not searcher.adopt("c", configs["c"])  # held already: taken once


def test_a_trial_whose_values_hyperopt_would_not_draw_again_is_added_and_the_draw_marked_failed(tmp_path):
    searcher, configs = restored_hyperopt(tmp_path)
    other = {"optim.lr": 0.01, "optim.momentum": 0.9}
    assert configs["c"] != other
    assert searcher.adopt("c", other)
    searcher.on_trial_complete("c", {"val_acc": 0.4})
    assert hyperopt_points(searcher)[-2:] == [("error", None), ("done", -0.4)]
    told = searcher._hpopt_trials.trials[-1]["misc"]["vals"]
    assert (told["optim.lr"], told["optim.momentum"]) == ([0.01], [1])  # a choice as its index


def test_a_random_or_pbt_studys_draws_follow_train_seed():
    """Three runs of the same PBT smoke study drew three populations (lr 0.0591/0.00123, 0.0354/0.0121, ...) and
    replicate seeds: Tune's generator was not seeded. Now train.seed gives the draws, as it does a searcher's."""
    from ray import tune

    from ray_cifar.config import Config
    from ray_cifar.tuning.searchers import create_search_alg

    def draws(seed: int) -> list:
        cfg = Config()
        cfg.tune.search, cfg.train.seed = "random", seed
        alg = create_search_alg(cfg)
        alg.add_configurations([tune.Experiment("x", run=lambda config: None, num_samples=3, config={
            "optim.lr": tune.loguniform(1e-4, 1e-1), "train.seed": tune.randint(0, 2**31 - 2)})])
        made = []
        while (trial := alg.next_trial()) is not None:
            made.append((trial.config["optim.lr"], trial.config["train.seed"]))
        return made

    assert len(draws(0)) == 3 and draws(0) == draws(0) != draws(1)
