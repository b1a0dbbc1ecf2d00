# Images for docker-compose.yml: `server` (api and worker run it with different commands) and `bo` (the same plus
# botorch, for `tokencredit bo run`).
FROM python:3.11-slim AS server
WORKDIR /app
# A C++ compiler for torch.compile'd coalition rows (--compile-rows auto on CPU); without one rows fall back to eager.
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
# torch pinned; pass --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 for a GPU worker image.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir torch==2.13.0 --index-url ${TORCH_INDEX}
COPY client ./client
COPY pyproject.toml README.md ./
COPY service ./service
COPY workers ./workers
RUN pip install --no-cache-dir ./client .
EXPOSE 8000
CMD ["tokencredit-server", "serve", "--host", "0.0.0.0"]

# The last stage, so a plain `docker build .` still gives an image that serves (CMD inherited); compose's bo service
# sets its own command.
FROM server AS bo
RUN pip install --no-cache-dir "./client[bo]"
