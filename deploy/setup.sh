#!/usr/bin/env bash
# Once per project: what imagebeam's Dataflow jobs and Vertex AI training need (docs/cloud.md).
#
#   deploy/setup.sh PROJECT REGION BUCKET [--print]
#
# Enables the APIs (Dataflow, Vertex AI, Artifact Registry, Cloud Build), creates the bucket,
# the Artifact Registry repository `imagebeam` and the service account `imagebeam-runner`,
# and grants it its roles (and you the right to run jobs as it). Idempotent: each thing is
# looked up first (describe, list, get-iam-policy) and created or granted only if absent, so
# a second run changes nothing. --print prints the commands and runs nothing, not even the
# look-ups: no gcloud login needed. BUCKET may be given with or without gs://.
set -euo pipefail

usage() {
  echo "usage: deploy/setup.sh PROJECT REGION BUCKET [--print]" >&2
  exit 2
}

PRINT=0
ARGS=()
for arg in "$@"; do
  case "$arg" in
    --print) PRINT=1 ;;
    -h | --help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) usage ;;
    *) ARGS+=("$arg") ;;
  esac
done
[ "${#ARGS[@]}" -eq 3 ] || usage
PROJECT=${ARGS[0]}
REGION=${ARGS[1]}
BUCKET=gs://${ARGS[2]#gs://}
GCLOUD=${GCLOUD:-gcloud}  # the gcloud to run (tests put a stand-in here)
REPOSITORY=imagebeam
SA=imagebeam-runner@$PROJECT.iam.gserviceaccount.com
APIS=(dataflow.googleapis.com aiplatform.googleapis.com artifactregistry.googleapis.com
      cloudbuild.googleapis.com)
# The runner's roles: Dataflow worker, Vertex AI jobs, pulling the images, writing logs.
PROJECT_ROLES=(roles/dataflow.worker roles/aiplatform.user roles/artifactregistry.reader
               roles/logging.logWriter)

# One command as a shell would read it back.
show() {
  local out
  out=$(printf '%q ' "$@")
  echo "${out% }"
}

# ensure WHAT CHECK... -- CREATE...: CREATE unless CHECK succeeds and prints something.
ensure() {
  local what=$1 check=() create=()
  shift
  while [ "$1" != "--" ]; do check+=("$1"); shift; done
  shift
  create=("$@")
  if [ "$PRINT" = 1 ]; then
    echo "# $what; skipped if this prints it: $(show "${check[@]}")"
    show "${create[@]}"
    return
  fi
  local found
  if found=$("${check[@]}" 2>/dev/null) && [ -n "$found" ]; then
    echo "[setup] present: $what"
  else
    echo "[setup] creating: $what"
    "${create[@]}"
  fi
}

if [ "$PRINT" = 1 ]; then
  echo "# deploy/setup.sh $PROJECT $REGION $BUCKET: the commands it runs, each after its look-up"
  echo "# YOUR_ACCOUNT: gcloud config get-value account"
  ME=user:YOUR_ACCOUNT
else
  account=$("$GCLOUD" config get-value account 2>/dev/null || true)
  [ -n "$account" ] || { echo "error: no gcloud account: run \`gcloud auth login\`" >&2; exit 2; }
  case "$account" in
    *.gserviceaccount.com) ME=serviceAccount:$account ;;
    *) ME=user:$account ;;
  esac
fi

for api in "${APIS[@]}"; do
  ensure "API $api" \
    "$GCLOUD" services list --enabled --project "$PROJECT" --filter="config.name=$api" \
    --format='value(config.name)' \
    -- "$GCLOUD" services enable "$api" --project "$PROJECT"
done
ensure "bucket $BUCKET" \
  "$GCLOUD" storage buckets describe "$BUCKET" --format='value(name)' \
  -- "$GCLOUD" storage buckets create "$BUCKET" --location "$REGION" --project "$PROJECT"
ensure "Artifact Registry repository $REPOSITORY in $REGION" \
  "$GCLOUD" artifacts repositories describe "$REPOSITORY" --location "$REGION" \
  --project "$PROJECT" --format='value(name)' \
  -- "$GCLOUD" artifacts repositories create "$REPOSITORY" --repository-format docker \
  --location "$REGION" --project "$PROJECT"
ensure "service account $SA" \
  "$GCLOUD" iam service-accounts describe "$SA" --project "$PROJECT" --format='value(email)' \
  -- "$GCLOUD" iam service-accounts create imagebeam-runner --project "$PROJECT"
if [ "$PRINT" = 0 ]; then  # a new service account takes a few seconds to be grantable
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    "$GCLOUD" iam service-accounts describe "$SA" --project "$PROJECT" >/dev/null 2>&1 && break
    sleep 3
  done
fi
for role in "${PROJECT_ROLES[@]}"; do
  ensure "$role for $SA" \
    "$GCLOUD" projects get-iam-policy "$PROJECT" \
    "--flatten=bindings[].members" "--filter=bindings.role=$role AND bindings.members=serviceAccount:$SA" \
    "--format=value(bindings.role)" \
    -- "$GCLOUD" projects add-iam-policy-binding "$PROJECT" --member "serviceAccount:$SA" \
    --role "$role" --condition None
done
ensure "roles/storage.objectAdmin on $BUCKET for $SA" \
  "$GCLOUD" storage buckets get-iam-policy "$BUCKET" \
  "--flatten=bindings[].members" \
  "--filter=bindings.role=roles/storage.objectAdmin AND bindings.members=serviceAccount:$SA" \
  "--format=value(bindings.role)" \
  -- "$GCLOUD" storage buckets add-iam-policy-binding "$BUCKET" --member "serviceAccount:$SA" \
  --role roles/storage.objectAdmin
ensure "roles/iam.serviceAccountUser on $SA for you (to run jobs as it)" \
  "$GCLOUD" iam service-accounts get-iam-policy "$SA" --project "$PROJECT" \
  "--flatten=bindings[].members" \
  "--filter=bindings.role=roles/iam.serviceAccountUser AND bindings.members=$ME" \
  "--format=value(bindings.role)" \
  -- "$GCLOUD" iam service-accounts add-iam-policy-binding "$SA" --project "$PROJECT" \
  --member "$ME" --role roles/iam.serviceAccountUser

if [ "$PRINT" = 0 ]; then
  cat <<EOF
[setup] done. For the commands in docs/cloud.md:
export PROJECT=$PROJECT REGION=$REGION BUCKET=$BUCKET TAG=v1
export REPO=$REGION-docker.pkg.dev/$PROJECT/$REPOSITORY
export SA=$SA
EOF
fi
