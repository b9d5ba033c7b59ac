"""A study: preparing fields and points, computing ED along trajectories, aggregating, plotting, the demo."""
