"""A multimodal Meta-World task: a scripted expert that passes a wall on the left or on the right.

    expert = make_expert("button-press-wall-v3", "two-routes")
    expert.reset(rng)                     # draws this episode's route ("left" or "right")
    action = expert.get_action(env.obs)   # like Meta-World's own experts

button-press-wall-v3 has a low wall (x 0.0 .. 0.2, y 0.6, 15 cm tall) between the hand and the
button. Meta-World's expert lifts over it; ``TwoRouteExpert`` keeps the hand 10 cm above the table
and goes around it instead, by a route drawn at random per episode (from a shuffled pair, so every
two episodes take both: each layout's demonstrations hold both routes equally). Both routes start
alike: the hand goes to a split point 20 cm in front of the wall's centre, then diagonally (both action
components saturated, so the hand keeps its full forward speed) past the wall's left (x = -0.1) or
right (x = 0.3) end to 10 cm behind it, and Meta-World's expert presses the button from there.

The route is not in the first frame, and the average of the two routes is no route: from the split
point the routes' actions are (-1, 1, 0) and (1, 1, 0), whose mean drives the hand straight into the
wall at full speed, where it stalls (tests/test_routes.py). The learned teacher sampled with one step
(its mean chunk) keeps half its success; a sampler that commits to a route does not need to
(README). ``RouteTracker`` tells which route an episode took: the side of the wall's centre the hand
was on when it crossed the wall's plane.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

from wam_fast.eval import metaworld as mw

EXPERTS = ("metaworld", "two-routes")
ROUTES = ("left", "right")
# button-press-wall-v3's wall (assets/sawyer_xyz/sawyer_button_press_wall.xml): centre x 0.1, plane y 0.6.
TWO_ROUTE_TASKS = {"button-press-wall-v3": {"wall_x": 0.1, "wall_y": 0.6}}
HEIGHT = 0.10  # of the hand while it goes around the wall: below the wall's top (0.15)
SPLIT = 0.20  # how far in front of the wall's plane the routes split
PAST = 0.10  # how far behind it they hand over to Meta-World's expert
SIDE = 0.20  # how far left / right of the wall's centre the routes pass (its half-width is 0.1)
GAIN = 10.0
REACHED = 0.015  # metres from a waypoint at which the expert turns to the next


class TwoRouteExpert:
    """Around the wall by the left or the right, drawn per episode (``reset``); then Meta-World's expert."""

    def __init__(self, task: str):
        if task not in TWO_ROUTE_TASKS:
            raise ValueError(f"the two-route expert is defined for {sorted(TWO_ROUTE_TASKS)}, not {task!r}")
        self.task, self.wall = task, TWO_ROUTE_TASKS[task]
        self.finish = mw.expert_policy(task)
        self.route: Optional[str] = None
        self.waypoint = 0
        self._pair: list = []  # the routes left of the current shuffled pair

    def reset(self, rng: np.random.Generator, route: Optional[str] = None) -> str:
        """Start an episode on ``route`` (default: the next of a pair of both routes shuffled by ``rng``,
        so each is drawn with probability 1/2 and consecutive pairs hold both)."""
        if route is not None and route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
        if route is None:
            if not self._pair:
                self._pair = [ROUTES[i] for i in rng.permutation(len(ROUTES))]
            route = self._pair.pop()
        self.route, self.waypoint = route, 0
        return self.route

    def waypoints(self) -> np.ndarray:
        """(2, 3): the split point in front of the wall's centre, and the point past the wall on the
        route's side (reached on a 45-degree diagonal: both action components saturate)."""
        x, y = self.wall["wall_x"], self.wall["wall_y"]
        side = x + (-SIDE if self.route == "left" else SIDE)
        return np.array([[x, y - SPLIT, HEIGHT], [side, y + PAST, HEIGHT]])

    def get_action(self, obs: np.ndarray) -> np.ndarray:
        if self.route is None:
            raise RuntimeError("TwoRouteExpert.reset(rng) draws the episode's route; call it before get_action")
        hand, points = np.asarray(obs[:3], dtype=np.float64), self.waypoints()
        while self.waypoint < len(points) and np.linalg.norm(points[self.waypoint] - hand) < REACHED:
            self.waypoint += 1
        if self.waypoint == len(points):
            return self.finish.get_action(obs)
        action = np.zeros(4, dtype=np.float32)
        action[:3] = GAIN * (points[self.waypoint] - hand)
        action[3] = 1.0  # the gripper stays open, as Meta-World's expert keeps it until the press
        return action


def expert_key(expert: str) -> dict:
    """What the demonstrations of ``expert`` depend on beyond the task (part of the demos stage's key)."""
    if expert == "two-routes":
        return {"expert": expert, "height": HEIGHT, "side": SIDE, "split": SPLIT, "past": PAST, "gain": GAIN,
                "reached": REACHED, "draw": "shuffled pairs"}
    return {}


def make_expert(task: str, expert: str = "metaworld"):
    """The scripted expert of ``task``: Meta-World's own ("metaworld") or ``TwoRouteExpert`` ("two-routes")."""
    if expert == "metaworld":
        return mw.expert_policy(task)
    if expert == "two-routes":
        return TwoRouteExpert(task)
    raise ValueError(f"expert must be one of {EXPERTS}, got {expert!r}")


class RouteTracker:
    """Which side of the wall each of a batch of episodes passed: ``observe`` the hand after every step."""

    def __init__(self, task: str, episodes: int):
        if task not in TWO_ROUTE_TASKS:
            raise ValueError(f"routes are defined for {sorted(TWO_ROUTE_TASKS)}, not {task!r}")
        self.wall = TWO_ROUTE_TASKS[task]
        self.routes: list = [None] * episodes

    def observe(self, episode: int, obs: np.ndarray) -> None:
        if self.routes[episode] is None and obs[1] >= self.wall["wall_y"]:
            self.routes[episode] = "left" if obs[0] < self.wall["wall_x"] else "right"

    def counts(self, among: Optional[Sequence[bool]] = None) -> Dict[str, int]:
        """Episodes per route ("none": the hand never crossed the wall's plane), of all episodes or of
        those where ``among`` is true (e.g. the successful ones)."""
        routes = [r for i, r in enumerate(self.routes) if among is None or among[i]]
        return {**{route: routes.count(route) for route in ROUTES}, "none": routes.count(None)}
