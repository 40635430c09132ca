{{/*
objectStore.workloadIdentity: the pods that read the store (API, Ray) run as a service account
your cloud maps to a role (IRSA / EKS Pod Identity, GKE or Azure Workload Identity), and no pod
holds a key. Keys and workload identity together are refused: one source of truth.
*/}}
{{- define "lorafleet.objectStoreServiceAccount" -}}
{{- $wi := .Values.objectStore.workloadIdentity }}
{{- if and $wi.enabled (or .Values.objectStore.accessKeyId .Values.objectStore.existingSecret) }}
{{- fail "objectStore.workloadIdentity.enabled: leave objectStore.accessKeyId and objectStore.existingSecret empty" }}
{{- end }}
{{- if and $wi.enabled $wi.serviceAccountName }}
serviceAccountName: {{ $wi.serviceAccountName }}
{{- end }}
{{- end }}

{{/*
A Ray pod template. (dict "root" $ "group" <head or worker group values> "head" bool "train" bool)
Ray pods get the object store's credentials in their own environment, from its Secret by
secretKeyRef (or none: workload identity), and (through KubeRay's authOptions) the Ray token:
never the database URL, the admin token or the internal secret. Ray Jobs carry no credential
(service.launcher.job_env): anything in a Ray Job is readable by whoever holds the Ray token.
*/}}
{{- define "lorafleet.rayPodTemplate" -}}
{{- $root := .root }}
{{- $group := .group }}
{{- $gpus := int (default 0 $group.gpus) -}}
metadata:
  labels:
    {{- include "lorafleet.selectorLabels" (dict "root" $root "component" (ternary "ray-train" "ray-serve" .train)) | nindent 4 }}
    {{- with $root.Values.global.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $root.Values.global.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- include "lorafleet.objectStoreServiceAccount" $root | nindent 2 }}
  {{- with $root.Values.global.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    runAsNonRoot: true
    # The ray user of the rayproject/ray base image.
    runAsUser: 1000
    runAsGroup: 100
    fsGroup: 100
    seccompProfile:
      type: RuntimeDefault
  containers:
    - name: {{ ternary "ray-head" "ray-worker" .head }}
      {{- include "lorafleet.rayImage" $root | nindent 6 }}
      {{- if .head }}
      ports:
        - name: gcs-server
          containerPort: 6379
        - name: dashboard
          containerPort: 8265
        - name: client
          containerPort: 10001
        {{- if not .train }}
        - name: serve
          containerPort: 8000
        {{- end }}
      {{- end }}
      env:
        {{- include "lorafleet.env.rayObjectStore" $root | nindent 8 }}
        {{- if .train }}
        - name: LORAFLEET_PUBLIC_URL
          value: {{ include "lorafleet.apiUrl" $root | quote }}
        {{- else }}
        {{- include "lorafleet.env.serveSigningKey" $root | nindent 8 }}
        {{- end }}
        {{- with $root.Values.ray.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      resources:
        {{- $requests := deepCopy (default dict $group.resources.requests) }}
        {{- $limits := deepCopy (default dict $group.resources.limits) }}
        {{- if gt $gpus 0 }}
        {{- $_ := set $requests "nvidia.com/gpu" $gpus }}
        {{- $_ := set $limits "nvidia.com/gpu" $gpus }}
        {{- end }}
        {{- with $requests }}
        requests:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- with $limits }}
        limits:
          {{- toYaml . | nindent 10 }}
        {{- end }}
      securityContext:
        allowPrivilegeEscalation: false
        capabilities:
          drop: [ALL]
      volumeMounts:
        - name: ray-logs
          mountPath: /tmp/ray
        - name: dshm
          mountPath: /dev/shm
  volumes:
    - name: ray-logs
      emptyDir: {}
    # Ray's object store lives in shared memory.
    - name: dshm
      emptyDir:
        medium: Memory
  {{- with $group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* A RayCluster spec. (dict "root" $ "head" <head values> "workerGroups" <list> "train" bool) */}}
{{- define "lorafleet.rayClusterSpec" -}}
{{- $root := .root }}
{{- $train := .train -}}
rayVersion: {{ $root.Values.ray.rayVersion | quote }}
authOptions:
  mode: token
  secretName: {{ include "lorafleet.rayTokenSecretName" $root }}
enableInTreeAutoscaling: true
autoscalerOptions:
  idleTimeoutSeconds: {{ $root.Values.ray.autoscaler.idleTimeoutSeconds }}
  upscalingMode: {{ $root.Values.ray.autoscaler.upscalingMode }}
  resources:
    requests: {cpu: 200m, memory: 256Mi}
    limits: {cpu: 500m, memory: 512Mi}
  securityContext:
    allowPrivilegeEscalation: false
    runAsNonRoot: true
    capabilities:
      drop: [ALL]
headGroupSpec:
  # num-cpus 0 keeps training and serving work off the head.
  rayStartParams:
    {{- include "lorafleet.rayStartParams" (dict "defaults" (dict "dashboard-host" "0.0.0.0" "num-cpus" "0") "params" .head.rayStartParams) | nindent 4 }}
  template:
    {{- include "lorafleet.rayPodTemplate" (dict "root" $root "group" .head "head" true "train" $train) | nindent 4 }}
workerGroupSpecs:
  {{- range .workerGroups }}
  {{- if gt (int .minReplicas) (int .maxReplicas) }}
  {{- fail (printf "worker group %q: minReplicas must not exceed maxReplicas" .name) }}
  {{- end }}
  - groupName: {{ .name }}
    replicas: {{ max (int .minReplicas) (int (default 0 .replicas)) | min (int .maxReplicas) }}
    minReplicas: {{ .minReplicas }}
    maxReplicas: {{ .maxReplicas }}
    rayStartParams:
      {{- include "lorafleet.rayStartParams" (dict "defaults" (ternary (dict "num-gpus" (toString .gpus)) dict (gt (int (default 0 .gpus)) 0)) "params" .rayStartParams) | nindent 6 }}
    template:
      {{- include "lorafleet.rayPodTemplate" (dict "root" $root "group" . "head" false "train" $train) | nindent 6 }}
  {{- end }}
{{- end }}

{{/* rayStartParams as strings (the CRD's type): (dict "defaults" dict "params" <user values>) */}}
{{- define "lorafleet.rayStartParams" -}}
{{- $out := dict }}
{{- range $k, $v := merge (dict) (default dict .params) .defaults }}
{{- $_ := set $out $k (toString $v) }}
{{- end }}
{{- toYaml $out }}
{{- end }}
