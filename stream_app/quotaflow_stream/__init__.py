"""quotaflow's stream processor: a Faust app that aggregates usage and publishes quota states."""
