#!/usr/bin/env bash
# Issue 21 on the lent GPU machine: the compose stack in GPU-pinned containers, beside the
# process backend, on one warm machine. Device calls, chained within the 30 s the machine
# stays warm (each step reuses what the last left in /var/tmp and the running engine):
#   A  run(command="bash bench/docker_gpu/run.sh A", carry=[".gpu-carry/engine"])
#      engine (start_engine.sh), the base image (make_base.sh), what the host offers
#   B  run(command="bash bench/docker_gpu/run.sh B", carry=[".gpu-carry/pack", ".gpu-carry/tokenizer", ".gpu-carry/smoke-alpaca.json"])
#      host venv and random Gemma2-9B (gpu_common.sh), the CDI spec (`deploy cdi-spec`), both
#      images built offline with the unchanged docker/Dockerfile, the hardened GPU container
#      check, then the process backend's rounds (FedAvg, FlexLoRA)
#   C  same carry: the same rounds with `--backend docker --gpu-request cdi`
#   D  same carry: faults in containers, then a plain `docker compose up` of a rendered CDI file
# Conditions as bench/round_time/side_by_side.sh: random Gemma2-9B-shaped weights, the demo
# tokenizer, 1,600 long rows, FP4 + LoRA r=8 on q_proj,v_proj, 20 nodes, 2 a round, 4 rounds.
. bench/gpu_common.sh "docker_gpu_$1.log"
R=/var/tmp/docker-gpu-results
mkdir -p "$R"
BASE=flowertune-gpu-base:host
export DOCKER_BUILDKIT=0  # the classic builder: no buildx plugin is carried
bench() {  # LABEL [round_bench options...]
  local label=$1; shift
  timeout -k 30 "$LIMIT" $PY bench/round_bench.py --label "$label" --gpus 0 --runs fedavg,flexlora --rounds "${ROUNDS:-4}" --model "$MODEL" \
    --data "$DATA" --workdir /var/tmp/round-bench --json "$R/$label.json" "$@" > "$R/$label.log" 2>&1
  echo "$label exited $?"; grep "^\[" "$R/$label.log"; tail -n 5 "$R/$label.log"
}
case "$1" in
  A)
    stamp "engine"
    bash bench/docker_gpu/start_engine.sh || exit 1
    nvidia-smi -L; ls -l /dev/nvidia*; ldconfig -p | grep -E 'libcuda\.so|libnvidia-ml' || true
    df -h /var/tmp | tail -1
    stamp "base image"
    bash bench/docker_gpu/make_base.sh "$BASE" || exit 1
    stamp "service names on a user-defined network (Docker's embedded DNS)"
    docker network create dnscheck >/dev/null && docker run -d --rm --name dnspeer --network dnscheck "$BASE" sleep 60 >/dev/null
    docker run --rm --network dnscheck "$BASE" getent hosts dnspeer || { grep -i resolver /var/tmp/dockerd.log | tail -3; exit 1; }
    docker rm -f dnspeer >/dev/null; docker network rm dnscheck >/dev/null
    ;;
  B)
    gemma2_host "$R/model_build.json"
    stamp "CDI spec"
    $PY -m deploy cdi-spec --out /etc/cdi/nvidia.yaml || exit 1
    stamp "images (docker/Dockerfile, offline, from the carried wheels)"
    # The carried wheels as docker/wheelhouse, with wheelhouse.sh's own requirement lists. A
    # metadata-only uv stands in for flwr's uv (17 MB), which only runtime installs use, off here;
    # hatchling and its dependencies (pack/build/) build the project's own wheel in the image.
    rm -rf docker/wheelhouse /tmp/dkwheels && mkdir -p docker/wheelhouse /tmp/dkwheels
    tar -xJf .gpu-carry/pack/wheels.tar.xz -C /tmp/dkwheels
    cp /tmp/dkwheels/wheels/*.whl .gpu-carry/pack/uv-*.whl .gpu-carry/pack/build/*.whl docker/wheelhouse/
    sed -n "/^\"\$PY\" - \"\$ROOT\/pyproject.toml\" \"\$DEST\" <<'PY'\$/,/^PY\$/p" docker/wheelhouse.sh | sed '1d;$d' |
      python3 - pyproject.toml docker/wheelhouse
    cat docker/wheelhouse/requirements-superlink.txt
    digest=$($PY -c 'from pathlib import Path; from deploy.images import source_digest; print(source_digest(Path(".")))')
    for target in superlink app; do
      t=$SECONDS
      docker build -q --network none -f docker/Dockerfile --target $target --build-arg BASE_IMAGE=$BASE \
        --build-arg SOURCE_DIGEST="$digest" -t flowertune-deploy/$target:0.1.0 . > "$R/build_$target.log" 2>&1 \
        || { tail -n 30 "$R/build_$target.log"; exit 1; }
      echo "built $target in $((SECONDS - t)) s"
    done
    stamp "hardened GPU container: CDI, uid 1000, no capabilities, read-only root"
    docker run --rm --device nvidia.com/gpu=0 --read-only --user 1000:1000 --cap-drop ALL \
      --security-opt no-new-privileges --tmpfs /tmp:exec --tmpfs /home/flwr:exec,uid=1000,gid=1000 flowertune-deploy/app:0.1.0 \
      sh -c 'nvidia-smi -L; df -h /dev/shm | tail -1; python -c "import torch, bitsandbytes, flwr; x = torch.randn(4096, 4096, device=\"cuda\"); print(torch.cuda.get_device_name(0), torch.cuda.device_count(), float((x @ x).abs().mean()) > 0, bitsandbytes.__version__, flwr.__version__)"' \
      || exit 1
    stamp "process backend, 4 rounds FedAvg then 4 FlexLoRA on one deployment"
    LIMIT=400 bench process
    ;;
  C)
    gemma2_host "$R/model_build.json"
    chmod -R a+rX "$MODEL"  # transformers wrote the weights 0600; the containers run as uid 1000
    stamp "containers (deploy up --gpus 0 --gpu-request cdi), 4 rounds FedAvg then 4 FlexLoRA"
    LIMIT=540 bench docker --backend docker --gpu-request cdi
    docker ps -a --format '{{.Names}} {{.Status}}' | head -5
    ;;
  D)
    gemma2_host "$R/model_build.json"
    chmod -R a+rX "$MODEL"
    W=/var/tmp/compose-up && rm -rf "$W" && mkdir -p "$W"
    stamp "plain docker compose up of a rendered CDI file (3 rounds), crashing a trainer and a SuperNode"
    $PY -m deploy render --gpus 0 --gpu-request cdi --out "$W" --volume "$MODEL:/model:ro" --volume "$(dirname "$DATA"):/data:ro" \
      --run-config "model.name='/model' dataset.data-files='/data/$(basename "$DATA")' num-server-rounds=3" || exit 1
    cp "$W/compose.yaml" "$R/compose_cdi.yaml"
    compose=(docker compose -f "$W/compose.yaml" --project-directory "$W")
    t=$SECONDS
    "${compose[@]}" up -d --no-build > "$R/compose_up.log" 2>&1 || { tail -n 20 "$R/compose_up.log"; exit 1; }
    echo "compose up -d returned in $((SECONDS - t)) s"
    timeout -k 10 420 $PY bench/docker_gpu/faults.py --results "$W/results" --json "$R/faults.json" --timeout 400
    echo "faults exited $? after $((SECONDS - t)) s"
    "${compose[@]}" ps -a --format '{{.Service}} {{.Status}}' > "$R/compose_ps.txt" 2>&1
    "${compose[@]}" logs --no-color submit > "$R/compose_submit.log" 2>&1
    "${compose[@]}" logs --no-color trainer-gpu0 > "$R/compose_trainer.log" 2>&1
    grep -v -E 'supernode-([2-9]|1[0-9]) ' "$R/compose_ps.txt"
    tail -n 15 "$R/compose_submit.log"
    for c in $(docker ps -q); do docker inspect -f '{{.Name}} user={{.Config.User}} ro={{.HostConfig.ReadonlyRootfs}} capdrop={{.HostConfig.CapDrop}} secopt={{.HostConfig.SecurityOpt}} devices={{json .HostConfig.DeviceRequests}}' "$c"; done > "$R/hardening.txt"
    head -n 4 "$R/hardening.txt"
    "${compose[@]}" down -v > /dev/null 2>&1
    cp -r "$W/results" "$R/compose_results" 2>/dev/null
    ;;
esac
stamp "done"
tar -czf "$O/results_$1.tar.gz" -C /var/tmp --exclude='*.db*' --exclude='round-[0-9]*' --exclude='*.safetensors' \
  docker-gpu-results round-bench 2>/dev/null
