{{/*
The extender container: `tidal extender`, its verbs on 127.0.0.1 beside kube-scheduler
(sidecar) or on every address behind mutual TLS (split: callers must present a certificate the
client CA signed), and /healthz, /readyz, /metrics on the health port on the pod IP.
*/}}
{{- define "tidal.extenderContainer" -}}
{{- $ext := .Values.scheduler.extender -}}
{{- $sidecar := include "tidal.extenderSidecar" . | eq "true" -}}
- name: extender
  image: {{ include "tidal.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: [tidal]
  args:
    - extender
    - --host={{ if $sidecar }}127.0.0.1{{ else }}0.0.0.0{{ end }}
    - --port={{ int $ext.port }}
    - --health-port={{ int $ext.metricsPort }}
    - --reservation-ttl={{ $ext.reservationTTL }}
    - --log-level={{ $ext.logLevel }}
    - --log-format={{ $ext.logFormat }}
    {{- if not $sidecar }}
    - --tls-cert=/etc/tidal/extender-tls/tls.crt
    - --tls-key=/etc/tidal/extender-tls/tls.key
    - --tls-client-ca=/etc/tidal/extender-tls/ca.crt
    {{- end }}
  ports:
    {{- if not $sidecar }}
    - name: https
      containerPort: {{ int $ext.port }}
    {{- end }}
    - name: metrics
      containerPort: {{ int $ext.metricsPort }}
  readinessProbe:
    # 503 until the cache has synced (and while a reflector relists)
    httpGet:
      path: /readyz
      port: metrics
    periodSeconds: 5
  livenessProbe:
    httpGet:
      path: /healthz
      port: metrics
    initialDelaySeconds: 10
    periodSeconds: 10
    failureThreshold: 6
  resources:
    {{- toYaml $ext.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.scheduler.securityContext | nindent 4 }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
    {{- if not $sidecar }}
    - name: extender-tls
      mountPath: /etc/tidal/extender-tls
      readOnly: true
    {{- end }}
{{- end -}}
