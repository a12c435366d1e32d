"""core/energy.py: a wall-side meter (a charger's) counts only where it corroborates the
computer's draw; a meter of the computer itself counts as it reads."""

from p2pfleet.core.energy import account


def test_a_wall_meter_counts_when_it_saw_at_least_half_the_estimate():
    # 3600 s at 0.5 of 60 W: estimate 30 Wh
    s = account(3600, power_w=60, cpu_share=0.5, meter_before=100.0, meter_after=140.0,
                min_share_of_estimate=0.5)
    assert (s.wh, s.metered, s.baseline_wh) == (40.0, True, 140.0)
    s = account(3600, power_w=60, cpu_share=0.5, meter_before=100.0, meter_after=115.0,
                min_share_of_estimate=0.5)
    assert (s.wh, s.metered) == (15.0, True)


def test_a_wall_meter_that_saw_too_little_means_the_battery_ran_the_computer():
    s = account(3600, power_w=60, cpu_share=0.5, meter_before=100.0, meter_after=101.0,
                min_share_of_estimate=0.5)
    assert (s.wh, s.metered, s.baseline_wh) == (30.0, False, 101.0)


def test_a_meter_of_the_computer_itself_counts_any_increase():
    s = account(3600, power_w=60, cpu_share=0.5, meter_before=100.0, meter_after=101.0)
    assert (s.wh, s.metered) == (1.0, True)


def test_a_meter_missing_at_either_end_or_going_down_is_estimated():
    for before, after in ((None, 5.0), (5.0, None), (9.0, 5.0)):
        s = account(720, power_w=60, cpu_share=1.0, meter_before=before, meter_after=after,
                    min_share_of_estimate=0.5)
        assert (s.wh, s.metered) == (12.0, False)
