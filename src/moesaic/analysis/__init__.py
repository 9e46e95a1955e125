"""Analysis tools: routing traces, expert statistics, placement inputs."""
