import keras
import numpy as np
import pytest

from dg2pf_tf.core import schedules


def test_linear_schedule_is_the_papers_s_times_i_over_se():
    schedule = schedules.Linear(0.9, 10)
    levels = [schedule(epoch) for epoch in range(12)]
    np.testing.assert_allclose(levels[:10], [0.09 * i for i in range(1, 11)])
    assert levels[10:] == [0.9, 0.9]
    assert [schedule.is_active(e) for e in (0, 9, 10)] == [True, True, False]


def test_polynomial_schedule_is_cubic_and_reaches_the_target_with_linear():
    schedule = schedules.Polynomial(0.8, 4, initial_sparsity=0.0)
    expected = [0.8 * (1 - (1 - i / 4) ** 3) for i in range(1, 5)]
    np.testing.assert_allclose([schedule(e) for e in range(4)], expected)
    assert schedule(1) > schedules.Linear(0.8, 4)(1)


def test_constant_schedule_and_begin_epoch():
    schedule = schedules.Constant(0.7, begin_epoch=2)
    assert [schedule(e) for e in range(4)] == [0.0, 0.0, 0.7, 0.7]
    assert schedule.end_epoch == 3
    delayed = schedules.Linear(0.5, 2, begin_epoch=3)
    assert [delayed(e) for e in range(6)] == [0.0, 0.0, 0.0, 0.25, 0.5, 0.5]


def test_fractional_positions_interpolate_between_epoch_levels():
    schedule = schedules.Linear(0.8, 4)
    assert schedule(0.5) == pytest.approx(0.3)


@pytest.mark.parametrize(
    "schedule",
    [schedules.Linear(0.9, 10), schedules.Polynomial(0.95, 5, 0.1, 2.0, 1), schedules.Constant(0.5)],
)
def test_schedules_round_trip_through_keras_serialization(schedule):
    config = schedules.serialize(schedule)
    assert keras.saving.deserialize_keras_object(config) == schedule
    assert schedules.deserialize(config) == schedule


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: schedules.Linear(1.0, 10), r"\[0, 1\)"),
        (lambda: schedules.Linear(0.9, 0), "pruning_epochs"),
        (lambda: schedules.Linear(0.9, 2.5), "pruning_epochs"),
        (lambda: schedules.Polynomial(0.5, 3, initial_sparsity=0.6), "initial_sparsity"),
        (lambda: schedules.Polynomial(0.5, 3, power=0), "power"),
        (lambda: schedules.Constant(0.5, begin_epoch=-1), "begin_epoch"),
    ],
)
def test_bad_schedule_arguments_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()
