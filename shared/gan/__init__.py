"""The federated class-conditional GAN: networks, local training, quality, selection and augmentation."""
