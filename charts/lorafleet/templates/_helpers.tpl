{{/* Names ----------------------------------------------------------------------------------- */}}
{{- define "lorafleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Kept to 40 characters: KubeRay derives longer names (<cluster>-<group>-worker-xxxxx). */}}
{{- define "lorafleet.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "lorafleet.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "lorafleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lorafleet
{{- end }}

{{/* Selector labels of one component: (dict "root" $ "component" "api") */}}
{{- define "lorafleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lorafleet.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "lorafleet.componentLabels" -}}
{{ include "lorafleet.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "lorafleet.trainClusterName" -}}{{ include "lorafleet.fullname" . }}-train{{- end }}
{{- define "lorafleet.serviceName" -}}{{ include "lorafleet.fullname" . }}-serving{{- end }}

{{/* Images: (dict "image" .Values.api.image "repository" <global default> "root" $) */}}
{{- define "lorafleet.image" -}}
{{- $g := .root.Values.global.image -}}
{{- $repo := .image.repository | default .repository -}}
{{- $tag := .image.tag | default $g.tag | default .root.Chart.AppVersion -}}
image: {{ printf "%s:%s" $repo $tag | quote }}
imagePullPolicy: {{ .image.pullPolicy | default $g.pullPolicy }}
{{- end }}

{{- define "lorafleet.controlPlaneImage" -}}
{{ include "lorafleet.image" (dict "image" .image "repository" .root.Values.global.image.controlPlaneRepository "root" .root) }}
{{- end }}

{{- define "lorafleet.rayImage" -}}
{{ include "lorafleet.image" (dict "image" .Values.ray.image "repository" .Values.global.image.rayRepository "root" .) }}
{{- end }}

{{/* Secrets: one per audience, so a pod references only what it may read. ------------------ */}}
{{/* database.url wins over database.existingSecret (which has a default name). */}}
{{- define "lorafleet.databaseSecretName" -}}
{{- if .Values.database.url }}{{ include "lorafleet.fullname" . }}-database{{ else }}{{ .Values.database.existingSecret }}{{ end }}
{{- end }}
{{- define "lorafleet.databaseSecretKey" -}}
{{- if .Values.database.url }}url{{ else }}{{ .Values.database.existingSecretKey }}{{ end }}
{{- end }}
{{- define "lorafleet.objectStoreSecretName" -}}
{{- .Values.objectStore.existingSecret | default (printf "%s-object-store" (include "lorafleet.fullname" .)) }}
{{- end }}
{{/* Credentials are optional (an instance role, or objectStore.workloadIdentity): no secret,
no credential env. */}}
{{- define "lorafleet.objectStoreHasCredentials" -}}
{{- if and (not .Values.objectStore.workloadIdentity.enabled) (or .Values.objectStore.existingSecret .Values.objectStore.accessKeyId) }}true{{ end }}
{{- end }}
{{- define "lorafleet.authSecretName" -}}
{{- .Values.auth.existingSecret | default (printf "%s-auth" (include "lorafleet.fullname" .)) }}
{{- end }}
{{- define "lorafleet.rayTokenSecretName" -}}
{{- .Values.ray.auth.existingSecret | default (printf "%s-ray-token" (include "lorafleet.fullname" .)) }}
{{- end }}

{{/* A generated secret value that survives upgrades: (dict "root" $ "secret" name "key" k "value" v "length" n) */}}
{{- define "lorafleet.persistentSecretValue" -}}
{{- if .value }}
{{- .value | b64enc }}
{{- else }}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .secret }}
{{- if and $existing (hasKey $existing.data .key) }}
{{- index $existing.data .key }}
{{- else }}
{{- randAlphaNum (int .length) | b64enc }}
{{- end }}
{{- end }}
{{- end }}

{{/* URLs ------------------------------------------------------------------------------------- */}}
{{- define "lorafleet.apiUrl" -}}
{{- .Values.api.publicUrl | default (printf "http://%s-api.%s.svc:%d" (include "lorafleet.fullname" .) .Release.Namespace (int .Values.api.service.port)) }}
{{- end }}
{{- define "lorafleet.rayAddress" -}}
http://{{ include "lorafleet.trainClusterName" . }}-head-svc.{{ .Release.Namespace }}.svc:8265
{{- end }}
{{- define "lorafleet.serveUrl" -}}
http://{{ include "lorafleet.serviceName" . }}-serve-svc.{{ .Release.Namespace }}.svc:8000
{{- end }}

{{/* Base model the serving application loads. */}}
{{- define "lorafleet.serveBaseModelUri" -}}
{{- $id := .Values.serve.baseModel | default .Values.baseModels.default }}
{{- $uri := "" }}
{{- range .Values.baseModels.catalog }}{{ if eq .id $id }}{{ $uri = .sourceUri }}{{ end }}{{ end }}
{{- if not $uri }}
{{- fail (printf "serve.baseModel / baseModels.default %q is not in baseModels.catalog" $id) }}
{{- end }}
{{- $uri }}
{{- end }}

{{/* Environment blocks ---------------------------------------------------------------------- */}}
{{- define "lorafleet.env.database" -}}
- name: LORAFLEET_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "lorafleet.databaseSecretName" . }}
      key: {{ include "lorafleet.databaseSecretKey" . }}
{{- end }}

{{/* Where the object store is, without credentials: the scheduler names it in each run's spec
but never reads or writes it. The LORAFLEET_S3_* names service/settings.py reads. */}}
{{- define "lorafleet.env.objectStoreAddress" -}}
- name: LORAFLEET_OBJECT_STORE_URL
  value: {{ .Values.objectStore.url | quote }}
- name: LORAFLEET_S3_REGION
  value: {{ .Values.objectStore.region | quote }}
{{- with .Values.objectStore.endpointUrl }}
- name: LORAFLEET_S3_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{/* The API: the object store's address and credentials. */}}
{{- define "lorafleet.env.objectStore" -}}
{{ include "lorafleet.env.objectStoreAddress" . }}
{{- if include "lorafleet.objectStoreHasCredentials" . }}
- name: LORAFLEET_S3_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "lorafleet.objectStoreSecretName" . }}
      key: {{ .Values.objectStore.accessKeyIdKey }}
- name: LORAFLEET_S3_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "lorafleet.objectStoreSecretName" . }}
      key: {{ .Values.objectStore.secretAccessKeyKey }}
{{- end }}
{{- end }}

{{/* Ray pods: the standard AWS names that boto3 / pyarrow pick up. */}}
{{- define "lorafleet.env.rayObjectStore" -}}
- name: LORAFLEET_OBJECT_STORE_URL
  value: {{ .Values.objectStore.url | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ .Values.objectStore.region | quote }}
- name: AWS_REGION
  value: {{ .Values.objectStore.region | quote }}
{{- with .Values.objectStore.endpointUrl }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- if include "lorafleet.objectStoreHasCredentials" . }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "lorafleet.objectStoreSecretName" . }}
      key: {{ .Values.objectStore.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "lorafleet.objectStoreSecretName" . }}
      key: {{ .Values.objectStore.secretAccessKeyKey }}
{{- end }}
{{- end }}

{{/* The one client of Ray, the scheduler (it submits jobs): the Ray token. */}}
{{- define "lorafleet.env.rayClient" -}}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "lorafleet.rayTokenSecretName" . }}
      key: auth_token
{{- if .Values.ray.enabled }}
- name: LORAFLEET_RAY_ADDRESS
  value: {{ include "lorafleet.rayAddress" . | quote }}
{{- end }}
{{- end }}

{{/* The API proxies inference to Serve's HTTP port: it needs the address, not the Ray token. */}}
{{- define "lorafleet.env.serveClient" -}}
{{- if .Values.serve.enabled }}
- name: LORAFLEET_SERVE_URL
  value: {{ include "lorafleet.serveUrl" . | quote }}
{{- end }}
{{- end }}

{{- define "lorafleet.env.internalSecret" -}}
- name: LORAFLEET_INTERNAL_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "lorafleet.authSecretName" . }}
      key: internal-secret
{{- end }}

{{- define "lorafleet.env.common" -}}
- name: LORAFLEET_DATA_DIR
  value: /tmp/lorafleet
# Migrations run once per release, as the hook Job, not in every starting replica.
- name: LORAFLEET_AUTO_MIGRATE
  value: "false"
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
- name: LORAFLEET_PUBLIC_URL
  value: {{ include "lorafleet.apiUrl" . | quote }}
- name: LORAFLEET_DEFAULT_BASE_MODEL
  value: {{ .Values.baseModels.default | quote }}
- name: LORAFLEET_TENANT_MAX_CONCURRENT_JOBS
  value: {{ .Values.tenantDefaults.maxConcurrentJobs | int64 | quote }}
- name: LORAFLEET_TENANT_MAX_QUEUED_JOBS
  value: {{ .Values.tenantDefaults.maxQueuedJobs | int64 | quote }}
- name: LORAFLEET_TENANT_REQUESTS_PER_MINUTE
  value: {{ .Values.tenantDefaults.requestsPerMinute | int64 | quote }}
{{- end }}

{{/* Pod plumbing shared by the control-plane pods. */}}
{{- define "lorafleet.podCommon" -}}
automountServiceAccountToken: false
{{- with .Values.global.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.global.podSecurityContext | nindent 2 }}
{{- end }}

{{/* Waits until the database is at alembic's head revision (see README: why both this and the hook). */}}
{{- define "lorafleet.waitForMigrations" -}}
- name: wait-for-migrations
  {{- include "lorafleet.controlPlaneImage" (dict "image" .Values.migrations.image "root" .) | nindent 2 }}
  command:
    - sh
    - -c
    - |
      until alembic current 2>/dev/null | grep -q '(head)'; do
        echo "waiting for database migrations (alembic upgrade head)"; sleep 5
      done
  env:
    - name: PYTHONDONTWRITEBYTECODE
      value: "1"
    {{- include "lorafleet.env.database" . | nindent 4 }}
  securityContext:
    {{- toYaml .Values.global.containerSecurityContext | nindent 4 }}
  resources:
    {{- toYaml .Values.migrations.resources | nindent 4 }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
{{- end }}
