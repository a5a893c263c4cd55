"""Plans, limits and the monthly periods usage and budgets are counted in."""
