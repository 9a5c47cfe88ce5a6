"""Step load that finds the saturation point: 8 more users every 20 s, up to 128.

    locust -f loadtests/stepload.py --headless --host http://127.0.0.1:3000 --csv results/step

Then `python loadtests/saturation.py results/step_stats_history.csv` names the step after which
requests/s stopped growing.
"""

from locust import LoadTestShape
from locustfile import DeepServeUser  # noqa: F401  (the users this shape drives)


class StepLoad(LoadTestShape):
    step_users, step_seconds, max_users = 8, 20, 128

    def tick(self):
        step = int(self.get_run_time() // self.step_seconds) + 1
        users = step * self.step_users
        if users > self.max_users:
            return None
        return users, self.step_users
