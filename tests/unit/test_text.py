"""Stop strings never leak: the filter holds back what may become a stop and cuts at the earliest."""

from engines.text import StopStringFilter


def test_stop_filter_holds_back_a_possible_stop_and_cuts_at_it():
    stops = StopStringFilter(["###", "END"])
    assert stops.push("hello #") == ("hello ", False)
    assert stops.push("#") == ("", False)
    assert stops.push(" not a stop") == ("## not a stop", False)
    assert stops.push(" E") == (" ", False)
    assert stops.push("NDING") == ("", True)


def test_stop_filter_earliest_stop_wins_and_flush_returns_the_rest():
    stops = StopStringFilter(["b", "abc"])
    assert stops.push("xxab") == ("xxa", True)
    tail = StopStringFilter(["<|end|>"])
    assert tail.push("done <|en") == ("done ", False)
    assert tail.flush() == "<|en"


def test_no_stops_passes_through():
    assert StopStringFilter([]).push("anything") == ("anything", False)
