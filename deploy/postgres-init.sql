-- Temporal's databases live on the same server as Slopbox's (auto-setup creates their schemas).
CREATE DATABASE temporal;
CREATE DATABASE temporal_visibility;
