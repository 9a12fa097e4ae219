"""The deploy saga: ``planner`` is its pure core (decide); the async runner executes (act)."""
