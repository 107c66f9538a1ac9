// The Node.js example of docs/protocol.md, exactly as written there but for the URL and
// the token, which come from DROID_EVENTS_URL and DROID_TOKEN (run by tests/test_events_js.py).
import { io } from 'socket.io-client';

class TaskEventsService {
  constructor(token) {
    this.socket = io(process.env.DROID_EVENTS_URL, {
      auth: { token }
    });

    this.setupListeners();
  }

  setupListeners() {
    this.socket.on('connected', this.onConnected);
    this.socket.on('task.created', this.onTaskCreated);
    this.socket.on('task.processing', this.onTaskProcessing);
    this.socket.on('task.completed', this.onTaskCompleted);
    this.socket.on('task.failed', this.onTaskFailed);
    this.socket.on('task.cancelled', this.onTaskCancelled);
  }

  onConnected(data) {
    console.log('Connected to real-time events', data);
  }

  onTaskCreated(event) {
    // Atualizar estado/UI
    console.log('Task created', event.data);
  }

  onTaskProcessing(event) {
    console.log('Task processing', event.data);
  }

  onTaskCompleted(event) {
    console.log('Task completed', event.data);
  }

  onTaskFailed(event) {
    console.error('Task failed', event.data);
  }

  onTaskCancelled(event) {
    console.log('Task cancelled', event.data);
  }

  disconnect() {
    this.socket.disconnect();
  }
}

// Uso
const token = process.env.DROID_TOKEN;
const taskEvents = new TaskEventsService(token);
